"""DatasetService's logic, free of gRPC: uploads become datasets; datasets are read, listed,
previewed, compared and deleted."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from tunefleet.core import names
from tunefleet.core.errors import InvalidArgument, NotFound
from tunefleet.core.names import dataset_id, lease_name
from tunefleet.datasets import store
from tunefleet.datasets.dedup import MinHasher, exact_key, jaccard, near_pairs
from tunefleet.datasets.metrics import DatasetMetrics
from tunefleet.datasets.pipeline import (
    DatasetRejected,
    IngestOptions,
    Ingestor,
    IngestResult,
    prompt_key,
    stored_record,
)
from tunefleet.datasets.tokens import TokenCounter
from tunefleet.runtime.models import ModelCatalogue
from tunefleet.storage import idempotency
from tunefleet.storage.blobs import BlobStore
from tunefleet.storage.database import Database, utcnow
from tunefleet.storage.pagination import Page
from tunefleet.storage.spools import SpaceBudget
from tunefleet.v1.dataset_pb2 import DatasetFormat, DatasetKind

UPLOAD_SCOPE = "UploadDataset"
MAX_CONTAMINATION_EXAMPLES = 20
MAX_HOLDER = 256


@dataclass(frozen=True)
class UploadHeader:
    """Everything an upload says before its bytes."""

    options: IngestOptions
    display_name: str = ""
    description: str = ""
    labels: dict[str, str] | None = None
    request_id: str = ""
    validate_only: bool = False

    def fingerprint(self) -> str:
        document = [
            self.options.fingerprint(),
            self.display_name,
            self.description,
            sorted((self.labels or {}).items()),
            self.validate_only,
        ]
        return hashlib.sha256(orjson.dumps(document)).hexdigest()


@dataclass(eq=False)  # each upload is its own (a key of the space budget)
class Upload:
    """An upload in progress: feed it chunks, then `DatasetManager.complete` it."""

    header: UploadHeader
    ingestor: Ingestor
    existing: store.DatasetRow | None = None  # set when the request id was seen before


class DatasetManager:
    def __init__(
        self,
        db: Database,
        blobs: BlobStore,
        *,
        workdir: Path,
        models: ModelCatalogue | None = None,
        metrics: DatasetMetrics | None = None,
        space: SpaceBudget | None = None,
    ) -> None:
        self.db, self.blobs, self.workdir = db, blobs, workdir
        self.models = models or ModelCatalogue()
        self.metrics = metrics
        self.space = space or SpaceBudget(workdir, factor=0, min_free_bytes=0)

    # --- upload --------------------------------------------------------------------------------

    def start_upload(self, header: UploadHeader) -> Upload:
        """Check the header (references, request id) and prepare an ingestor."""
        options = header.options
        if header.request_id:
            request_id = idempotency.check_request_id(header.request_id)
            with self.db.session() as session:
                name = idempotency.lookup(session, UPLOAD_SCOPE, request_id, header.fingerprint())
                if name is not None:
                    existing = store.get(session, name.removeprefix("datasets/"))
                    return Upload(header, self._ingestor(options), existing)
        held_out: dict[bytes, str] = {}
        for index, name in enumerate(options.held_out_datasets):
            field = f"options.held_out_datasets[{index}]"
            name = f"datasets/{dataset_id(name, field)}"
            try:
                records = list(self.records(name))
            except NotFound as exc:
                raise InvalidArgument(field, exc.message) from None
            for record in records:
                held_out.setdefault(prompt_key(stored_record(record)), name)
        if options.validation_dataset:
            with self.db.session() as session:
                identifier = dataset_id(options.validation_dataset, "options.validation_dataset")
                try:
                    store.get(session, identifier)
                except NotFound as exc:
                    raise InvalidArgument("options.validation_dataset", exc.message) from None
        return Upload(header, self._ingestor(options, held_out))

    def _ingestor(
        self, options: IngestOptions, held_out: dict[bytes, str] | None = None
    ) -> Ingestor:
        counter = None
        if options.tokenizer_model:
            path = self.models.resolve(options.tokenizer_model, "options.tokenizer_model")
            counter = TokenCounter(path)
        return Ingestor(
            options,
            self.workdir / f"upload-{uuid.uuid4().hex}",
            count_tokens=counter,
            held_out=held_out,
        )

    def feed(self, upload: Upload, chunk: bytes) -> None:
        """The upload's next bytes, once the volume has room for what they will need."""
        upload.ingestor.feed(chunk)
        self.space.claim(upload, upload.ingestor.written_bytes)

    def complete(self, upload: Upload) -> store.DatasetRow:
        """Finish the upload: store the records blob and the dataset (unless validate_only).
        Whatever happens, the upload's working files are removed."""
        try:
            if upload.existing is not None:
                return upload.existing
            try:
                result = upload.ingestor.finish()
            except DatasetRejected as rejected:
                if self.metrics:
                    self.metrics.observe_rejected(rejected.report)
                raise
            row = self._row(upload.header, result)
            if upload.header.validate_only:
                return row  # nothing accepted, nothing counted
            if self.metrics:
                self.metrics.observe(result)
            blob = self.blobs.put_file(result.records_path)
            assert blob.sha256 == result.content_sha256
            with self.db.session() as session:
                row = store.insert(session, row)
                if upload.header.request_id:
                    idempotency.remember(
                        session,
                        UPLOAD_SCOPE,
                        idempotency.check_request_id(upload.header.request_id),
                        upload.header.fingerprint(),
                        f"datasets/{row.id}",
                    )
            return row
        finally:
            self.abort(upload)

    def abort(self, upload: Upload) -> None:
        upload.ingestor.close()
        self.space.release(upload)

    @staticmethod
    def _row(header: UploadHeader, result: IngestResult) -> store.DatasetRow:
        # The id depends on the records (after cleaning and splitting), the options that
        # produced them and what the upload says of them: the same file uploaded again as it was
        # is the same dataset; under another name, description or labels it is a new dataset
        # sharing the stored records.
        metadata = [header.display_name, header.description, sorted((header.labels or {}).items())]
        identity = hashlib.sha256(
            f"{result.content_sha256}:{header.options.fingerprint()}:".encode()
            + orjson.dumps(metadata)
        ).hexdigest()
        return store.DatasetRow(
            id=f"ds-{identity[:16]}",
            display_name=header.display_name,
            description=header.description,
            labels=dict(header.labels or {}),
            source_format=int(result.source_format),
            record_count=result.record_count,
            train_record_count=result.train_record_count,
            validation_record_count=result.validation_record_count,
            content_sha256=result.content_sha256,
            source_size_bytes=result.source_size_bytes,
            options=_options_document(header.options),
            validation_report=_document(result.validation),
            cleaning_report=_document(result.cleaning),
            token_statistics=result.token_statistics,
            create_time=utcnow(),
        )

    # --- reading -------------------------------------------------------------------------------

    def get(self, name: str) -> store.DatasetRow:
        with self.db.read() as session:
            return store.get(session, dataset_id(name))

    def list(self, filter_text: str, page_size: int, page_token: str) -> Page[store.DatasetRow]:
        with self.db.read() as session:
            return store.list_page(session, filter_text, page_size, page_token)

    def delete(self, name: str) -> None:
        with self.db.session() as session:
            orphan = store.delete(session, dataset_id(name))
        if orphan is not None:
            self.blobs.delete(orphan)

    # --- leases ----------------------------------------------------------------------------------

    def create_lease(self, parent: str, lease_id: str, holder: str) -> store.DatasetLease:
        identifier = dataset_id(parent, "parent")
        names.check_id(lease_id, "lease_id")
        if not holder or len(holder) > MAX_HOLDER:
            raise InvalidArgument("lease.holder", f"is required, at most {MAX_HOLDER} characters")
        with self.db.session() as session:
            lease = store.create_lease(session, identifier, lease_id, holder)
            session.expunge(lease)
            return lease

    def delete_lease(self, name: str, allow_missing: bool) -> None:
        identifier, lease_id = lease_name(name)
        with self.db.session() as session:
            if session.get(store.DatasetRow, identifier) is None and allow_missing:
                return
            store.get(session, identifier)
            store.delete_lease(session, identifier, lease_id, allow_missing)

    def leases(self, parent: str, page_size: int, page_token: str) -> Page[store.DatasetLease]:
        with self.db.read() as session:
            page = store.leases_page(session, dataset_id(parent, "parent"), page_size, page_token)
            for lease in page.items:
                session.expunge(lease)
            return page

    def records(
        self, name: str, split: str | None = None, offset: int = 0, limit: int | None = None
    ) -> Iterator[dict[str, Any]]:
        """The dataset's normalised records in order, optionally one side of the split."""
        if offset < 0:
            raise InvalidArgument("offset", f"must not be negative, got {offset}")
        if limit is not None and limit < 0:
            raise InvalidArgument("limit", f"must not be negative, got {limit}")
        row = self.get(name)
        skipped = sent = 0
        for line in _lines(self.blobs.open(row.content_sha256)):
            record: dict[str, Any] = orjson.loads(line)
            if split is not None and record["split"] != split:
                continue
            if skipped < offset:
                skipped += 1
                continue
            if limit is not None and sent >= limit:
                return
            sent += 1
            yield record

    # --- contamination -------------------------------------------------------------------------

    def contamination(self, name: str, evaluation: str, threshold: float) -> dict[str, Any]:
        """How many records of `evaluation` also appear, exactly or nearly, in `name`."""
        if not 0 < threshold <= 1:
            raise InvalidArgument("near_duplicate_threshold", f"must be in (0, 1], got {threshold}")
        train = list(self.records(name))
        held_out = list(self.records(evaluation))
        texts = ["\n".join(m["content"] for m in r["messages"]) for r in [*train, *held_out]]
        hasher = MinHasher()
        train_keys = {exact_key(r["messages"]): r["source_line"] for r in train}
        exact = {
            i: train_keys[key]
            for i, r in enumerate(held_out)
            if (key := exact_key(r["messages"])) in train_keys
        }
        examples = [
            {"kept_line": line, "removed_line": held_out[i]["source_line"], "similarity": 1.0}
            for i, line in sorted(exact.items())
        ]
        near: dict[int, tuple[int, float]] = {}
        if train and held_out:
            signatures = np.concatenate(
                [hasher.signatures(texts[i : i + 4096]) for i in range(0, len(texts), 4096)]
            )

            def similarity(a: int, b: int) -> float:
                values, counts = hasher.shingles([texts[a], texts[b]])
                first, second = np.split(values, [int(counts[0])])
                return jaccard(first, second)

            for pair in near_pairs(
                signatures, threshold, cross=(len(train), len(held_out)), exact=similarity
            ):
                index = pair.second - len(train)
                if index not in exact and (index not in near or pair.similarity > near[index][1]):
                    near[index] = (pair.first, pair.similarity)
        examples += [
            {
                "kept_line": train[t]["source_line"],
                "removed_line": held_out[i]["source_line"],
                "similarity": round(s, 4),
            }
            for i, (t, s) in sorted(near.items())
        ]
        return {
            "dataset": f"datasets/{dataset_id(name)}",
            "evaluation_dataset": f"datasets/{dataset_id(evaluation, 'evaluation_dataset')}",
            "near_duplicate_threshold": threshold,
            "evaluation_records": len(held_out),
            "exact_overlap": len(exact),
            "near_overlap": len(near),
            "examples": examples[:MAX_CONTAMINATION_EXAMPLES],
        }


def _lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    pending = b""
    for chunk in chunks:
        pending += chunk
        *complete, pending = pending.split(b"\n")
        yield from (line for line in complete if line)
    if pending:
        yield pending


def _document(report: Any) -> dict[str, Any]:
    return asdict(report)


def _options_document(options: IngestOptions) -> dict[str, Any]:
    """The options as the JSON of a DatasetOptions message."""
    document = asdict(options)
    document["format"] = DatasetFormat.Name(
        options.format or DatasetFormat.DATASET_FORMAT_UNSPECIFIED
    )
    document["invalid_record_policy"] = (
        f"INVALID_RECORD_POLICY_{options.invalid_record_policy.upper()}"
    )
    document["pii_policy"] = f"PII_POLICY_{options.pii_policy.upper()}"
    document["kind"] = DatasetKind.Name(options.kind)
    document["held_out_datasets"] = list(options.held_out_datasets)
    return document
