"""The ingestion pipeline: bytes in, a validated, cleaned and split dataset file out.

    feed(chunk) ...  parse records as bytes arrive (reader), validate and normalise them
                     (formats), find PII (pii), drop exact duplicates, spool kept records to disk
                     and MinHash them in batches (dedup)
    finish()         near duplicates (LSH over the spooled signatures), the split, the final
                     records file with its sha256, token statistics

Memory holds per-record bookkeeping (offsets, keys), never the records: they live in a spool file
in `workdir`, which `close()` removes whatever happened.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import time
from array import array
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import grpc
import numpy as np
import orjson
from google.protobuf import any_pb2
from google.rpc import error_details_pb2

from tunefleet.core.errors import InvalidArgument, TunefleetError, bounded
from tunefleet.datasets import pii
from tunefleet.datasets.dedup import (
    NUM_PERM,
    MinHasher,
    SignatureFile,
    UnionFind,
    exact_key,
    jaccard,
    near_pairs,
)
from tunefleet.datasets.formats import (
    FORMAT_NAMES,
    FileFormat,
    Message,
    Record,
    RecordInvalid,
    ignored_keys,
    kind_of,
    normalise_record,
)
from tunefleet.datasets.reader import SNIFF_BYTES, RawRecord, RecordReader, unsupported_kind
from tunefleet.storage import spools
from tunefleet.v1.dataset_pb2 import DatasetFormat, DatasetKind, PiiType, RecordErrorCode

MAX_LISTED_ERRORS = 10_000
# What a rejection's status lists of the rejected records: it travels in HTTP/2 trailers, which
# grpc clients refuse above 8 KiB (base64 adds a third), so a bounded number of bytes.
MAX_ERRORS_IN_STATUS = 100
MAX_VIOLATION_BYTES = 2048
MAX_VIOLATION_DESCRIPTION = 200
MAX_DUPLICATE_EXAMPLES = 20
MAX_IGNORED_KEYS = 20
# Records are MinHashed in batches of this many records or characters, whichever comes first.
SIGNATURE_BATCH = 4096
SIGNATURE_CHARS = 4_000_000


@dataclass(frozen=True)
class IngestOptions:
    """Resolved upload options (defaults applied); see DatasetOptions in dataset.proto."""

    format: DatasetFormat.ValueType | None = None
    invalid_record_policy: Literal["drop", "reject"] = "drop"
    min_record_count: int = 1
    max_record_chars: int = 1_000_000
    remove_exact_duplicates: bool = True
    remove_near_duplicates: bool = True
    near_duplicate_threshold: float = 0.8
    pii_policy: Literal["report", "redact", "drop"] = "redact"
    tokenizer_model: str = ""
    max_sequence_length: int = 2048
    validation_fraction: float = 0.1
    split_seed: int = 0
    validation_dataset: str = ""
    kind: DatasetKind.ValueType = DatasetKind.DATASET_KIND_UNSPECIFIED
    held_out_datasets: tuple[str, ...] = ()

    def fingerprint(self) -> str:
        """Hash of every option that shapes the dataset's content (part of its id)."""
        return hashlib.sha256(orjson.dumps(asdict(self), option=orjson.OPT_SORT_KEYS)).hexdigest()


@dataclass
class RecordError:
    line: int
    code: str  # a RecordErrorCode name
    message: str
    field: str = ""


@dataclass
class ValidationReport:
    total_records: int = 0
    valid_records: int = 0
    rejected_records: int = 0
    counts: list[dict[str, Any]] = field(default_factory=list)
    errors: list[RecordError] = field(default_factory=list)
    errors_truncated: bool = False
    ignored_keys: list[dict[str, Any]] = field(default_factory=list)
    tool_call_records: int = 0


@dataclass
class CleaningReport:
    exact_duplicates_removed: int = 0
    near_duplicates_removed: int = 0
    near_duplicate_examples: list[dict[str, Any]] = field(default_factory=list)
    pii_counts: list[dict[str, Any]] = field(default_factory=list)
    pii_records_redacted: int = 0
    pii_records_dropped: int = 0
    undesirable_records_dropped: int = 0


@dataclass
class IngestResult:
    """What `finish` produced: the records file and everything the Dataset resource reports."""

    records_path: Path
    content_sha256: str
    source_format: DatasetFormat.ValueType
    kind: DatasetKind.ValueType
    record_count: int
    train_record_count: int
    validation_record_count: int
    source_size_bytes: int
    validation: ValidationReport
    cleaning: CleaningReport
    token_statistics: dict[str, Any] | None
    duration_seconds: float


class DatasetRejected(TunefleetError):
    """The upload cannot become a dataset; the message says why, `report` lists the records."""

    code = grpc.StatusCode.INVALID_ARGUMENT
    default_reason = "DATASET_REJECTED"

    def __init__(self, message: str, report: ValidationReport) -> None:
        super().__init__(
            message,
            metadata={
                "total_records": str(report.total_records),
                "rejected_records": str(report.rejected_records),
            },
        )
        self.report = report

    def details(self) -> list[any_pb2.Any]:
        """ErrorInfo, plus a BadRequest listing the first rejected records by line: as many as
        fit in MAX_VIOLATION_BYTES, then one saying how many more there are."""
        bad_request = error_details_pb2.BadRequest()
        for e in self.report.errors[:MAX_ERRORS_IN_STATUS]:
            violation = error_details_pb2.BadRequest.FieldViolation(
                field=f"line {e.line}",
                description=bounded(f"{e.code}: {e.message}", MAX_VIOLATION_DESCRIPTION),
            )
            if bad_request.ByteSize() + violation.ByteSize() > MAX_VIOLATION_BYTES:
                break
            bad_request.field_violations.append(violation)
        left = self.report.rejected_records - len(bad_request.field_violations)
        if left > 0:
            bad_request.field_violations.add(
                field="records", description=f"and {left} more rejected records, not listed here"
            )
        packed = any_pb2.Any()
        packed.Pack(bad_request)
        return [*super().details(), packed]


class UnsupportedFileFormat(InvalidArgument):
    """The file is not JSON lines or a JSON array (Parquet, CSV, a compressed file...)."""

    def __init__(self, kind: str) -> None:
        super().__init__(
            "file",
            f"looks like {kind}; upload JSON lines (one JSON object per line) or one JSON array "
            "of objects, for example from pandas: df.to_json(path, orient='records', lines=True)",
            reason="UNSUPPORTED_FILE_FORMAT",
        )


# A TokenCounter measures a batch of conversations: (total tokens, trainable tokens) each.
TokenMeasure = Callable[[list[list[Message]]], list[tuple[int, int]]]


class Ingestor:
    """One upload in progress."""

    def __init__(
        self,
        options: IngestOptions,
        workdir: Path,
        *,
        count_tokens: TokenMeasure | None = None,
        hasher: MinHasher | None = None,
        held_out: Mapping[bytes, str] | None = None,
    ) -> None:
        self.options = options
        self._held_out = held_out or {}  # prompt_key -> the held-out dataset that has it
        self.workdir = workdir
        workdir.mkdir(parents=True, exist_ok=True)
        self._owner = spools.hold(workdir)  # a sweep after a crash knows it was abandoned
        self._started = time.perf_counter()
        self._head: bytearray | None = bytearray()  # the file's first bytes, until sniffed
        self._reader = RecordReader(max_record_bytes=options.max_record_chars * 4 + 65_536)
        self._file = FileFormat(options.format)
        self._hasher = hasher or MinHasher()
        self._count_tokens = count_tokens
        self._spool_path = workdir / "records.spool"
        self._spool = self._spool_path.open("wb")
        self._signatures_path = workdir / "signatures.u32"
        self._signatures = self._signatures_path.open("wb")
        self._offsets = array("q")  # spool offset of each kept record
        self._lines = array("q")  # source line of each kept record
        self._keys = bytearray()  # 16-byte exact key of each kept record
        self._first_with_key: dict[bytes, int] = {}
        self._exact_links: list[tuple[int, int]] = []  # kept exact duplicates (not removing)
        self._pending_texts: list[str] = []
        self._pending_chars = 0
        self._validation = ValidationReport()
        self._cleaning = CleaningReport()
        self._error_counts: Counter[str] = Counter()
        self._pii_counts: Counter[str] = Counter()
        self._ignored_keys: Counter[str] = Counter()

    # --- streaming part ------------------------------------------------------------------------

    def feed(self, chunk: bytes) -> None:
        if self._head is not None:
            self._sniff(chunk, final=False)
        for raw in self._reader.feed(chunk):
            self._record(raw)

    def _sniff(self, chunk: bytes, final: bool) -> None:
        """Refuse a file that is not JSON, once its first line (or SNIFF_BYTES) has arrived."""
        assert self._head is not None
        self._head += chunk[: SNIFF_BYTES - len(self._head)]
        if final or len(self._head) >= SNIFF_BYTES or b"\n" in self._head.lstrip():
            head, self._head = bytes(self._head), None
            kind = unsupported_kind(head)
            if kind is not None:
                raise UnsupportedFileFormat(kind)

    @property
    def written_bytes(self) -> int:
        """Bytes of working files written so far (spool and signatures, those of the batch not
        yet hashed included)."""
        batched = len(self._pending_texts) * NUM_PERM * 4  # uint32 each
        return self._spool.tell() + self._signatures.tell() + batched

    def _record(self, raw: RawRecord) -> None:
        self._validation.total_records += 1
        if raw.error is not None:
            if raw.error == "too_long":
                self._reject(
                    raw.line,
                    RecordErrorCode.RECORD_ERROR_CODE_RECORD_TOO_LONG,
                    f"record is longer than {self._reader.max_record_bytes} bytes",
                )
            else:
                self._reject(
                    raw.line,
                    RecordErrorCode.RECORD_ERROR_CODE_INVALID_JSON,
                    raw.error.removeprefix("invalid_json: "),
                )
            return
        assert raw.text is not None
        try:
            parsed = orjson.loads(raw.text)
        except orjson.JSONDecodeError as exc:
            self._reject(raw.line, RecordErrorCode.RECORD_ERROR_CODE_INVALID_JSON, str(exc))
            return
        try:
            record: Record | None = normalise_record(parsed, self._file)
        except RecordInvalid as exc:
            self._reject(raw.line, exc.code, exc.message, exc.field)
            return
        assert record is not None and self._file.format is not None
        self._check_kind(self._file.format)
        length = sum(len(m["content"]) for part in record.parts() for m in part)
        if length > self.options.max_record_chars:
            self._reject(
                raw.line,
                RecordErrorCode.RECORD_ERROR_CODE_RECORD_TOO_LONG,
                f"record has {length} characters of content, the limit is "
                f"{self.options.max_record_chars}",
            )
            return
        held_out = self._held_out.get(prompt_key(record))
        if held_out is not None:
            self._reject(
                raw.line,
                RecordErrorCode.RECORD_ERROR_CODE_HELD_OUT,
                f"its prompt is a prompt of {held_out}, which options.held_out_datasets keeps out "
                "of training",
                "messages",
            )
            return
        self._validation.valid_records += 1
        for unread in ignored_keys(parsed, self._file):
            if unread in self._ignored_keys or len(self._ignored_keys) < MAX_IGNORED_KEYS * 50:
                self._ignored_keys[unread] += 1
        if self.options.kind == DatasetKind.DATASET_KIND_SFT:
            record = record.as_sft()
            if record is None:
                self._cleaning.undesirable_records_dropped += 1
                return
        if any(m.get("tool_calls") for part in record.parts() for m in part):
            self._validation.tool_call_records += 1
        found = self._find_pii(record)
        if found and self.options.pii_policy == "drop":
            self._cleaning.pii_records_dropped += 1
            return
        key = exact_key(_turns(record))
        first = self._first_with_key.get(key)
        if first is not None and self.options.remove_exact_duplicates:
            self._cleaning.exact_duplicates_removed += 1
            return
        index = len(self._offsets)
        if first is None:
            self._first_with_key[key] = index
        else:
            self._exact_links.append((first, index))
        self._offsets.append(self._spool.tell())
        self._lines.append(raw.line)
        self._keys += key
        entry = {"line": raw.line, **record.document(), "redacted_pii": found}
        self._spool.write(orjson.dumps(entry) + b"\n")
        text = _text_of(record)
        self._pending_texts.append(text)
        self._pending_chars += len(text)
        if len(self._pending_texts) >= SIGNATURE_BATCH or self._pending_chars >= SIGNATURE_CHARS:
            self._flush_signatures()

    def _scan(self, value: Any, types: set[str]) -> Any:
        """`value` (a text, or the JSON of a call's arguments) with the PII in its texts counted
        into `types` and the pii counts, and redacted if the policy says so."""
        if isinstance(value, dict):
            return {key: self._scan(item, types) for key, item in value.items()}
        if isinstance(value, list):
            return [self._scan(item, types) for item in value]
        if not isinstance(value, str):
            return value
        findings = pii.find(value)
        for finding in findings:
            name = PiiType.Name(finding.type)
            self._pii_counts[name] += 1
            types.add(name)
        if findings and self.options.pii_policy == "redact":
            return pii.redact(value, findings)
        return value

    def _check_kind(self, file_format: DatasetFormat.ValueType) -> None:
        """A preference kind asked of a file that holds something else refuses the upload."""
        wanted = self.options.kind
        if wanted in (DatasetKind.DATASET_KIND_UNSPECIFIED, DatasetKind.DATASET_KIND_SFT):
            return
        if kind_of(file_format, wanted) != wanted:
            raise InvalidArgument(
                "options.kind",
                f"is {DatasetKind.Name(wanted)} but the file is {FORMAT_NAMES[file_format]}, "
                f"which holds {DatasetKind.Name(kind_of(file_format, wanted))} records",
            )

    def _find_pii(self, record: Record) -> list[str]:
        """Count PII in every turn, redact it if the policy says so; the types found."""
        types: set[str] = set()
        for message in (m for part in record.parts() for m in part):
            message["content"] = self._scan(message["content"], types)
            for made in message.get("tool_calls", []):
                made["arguments"] = self._scan(made["arguments"], types)
        if types and self.options.pii_policy == "redact":
            self._cleaning.pii_records_redacted += 1
        return sorted(types)

    def _reject(
        self, line: int, code: RecordErrorCode.ValueType, message: str, path: str = ""
    ) -> None:
        name = RecordErrorCode.Name(code)
        self._validation.rejected_records += 1
        self._error_counts[name] += 1
        if len(self._validation.errors) < MAX_LISTED_ERRORS:
            self._validation.errors.append(RecordError(line, name, message, path))
        else:
            self._validation.errors_truncated = True

    def _flush_signatures(self) -> None:
        if self._pending_texts:
            self._signatures.write(self._hasher.signatures(self._pending_texts).tobytes())
            self._pending_texts.clear()
            self._pending_chars = 0

    # --- the whole file ------------------------------------------------------------------------

    def finish(self) -> IngestResult:
        if self._head is not None:
            self._sniff(b"", final=True)
        for raw in self._reader.finish():
            self._record(raw)
        self._flush_signatures()
        self._spool.close()
        self._signatures.close()
        validation = self._validation
        validation.counts = [{"code": c, "count": n} for c, n in sorted(self._error_counts.items())]
        validation.ignored_keys = [
            {"key": bounded(k, 128), "count": n}
            for k, n in self._ignored_keys.most_common(MAX_IGNORED_KEYS)
        ]
        self._check_rejection()
        kept = len(self._offsets)
        removed, clusters = self._near_duplicates(kept)
        final = [i for i in range(kept) if i not in removed]
        if len(final) < max(1, self.options.min_record_count):
            raise DatasetRejected(
                f"only {len(final)} records remain after cleaning, fewer than the minimum of "
                f"{max(1, self.options.min_record_count)}",
                validation,
            )
        validation_side = self._split(final, clusters)
        records_path = self.workdir / "records.jsonl"
        content_sha256, token_stats = self._write_final(final, validation_side, records_path)
        self._cleaning.pii_counts = [
            {"type": t, "count": n} for t, n in sorted(self._pii_counts.items())
        ]
        assert self._file.format is not None  # at least one valid record was seen
        return IngestResult(
            records_path=records_path,
            content_sha256=content_sha256,
            source_format=self._file.format,
            kind=kind_of(self._file.format, self.options.kind),
            record_count=len(final),
            train_record_count=len(final) - len(validation_side),
            validation_record_count=len(validation_side),
            source_size_bytes=self._reader.bytes_read,
            validation=validation,
            cleaning=self._cleaning,
            token_statistics=token_stats,
            duration_seconds=time.perf_counter() - self._started,
        )

    def _check_rejection(self) -> None:
        report = self._validation
        if report.total_records == 0:
            raise DatasetRejected("the upload contains no records", report)
        if report.valid_records == 0:
            first = report.errors[0] if report.errors else None
            detail = (
                f"; the first: line {first.line}: {first.code}: {first.message}" if first else ""
            )
            raise DatasetRejected(
                f"none of the {report.total_records} records is valid{detail}", report
            )
        if report.rejected_records and self.options.invalid_record_policy == "reject":
            first = report.errors[0]
            raise DatasetRejected(
                f"{report.rejected_records} of {report.total_records} records are invalid and the "
                f"invalid-record policy is REJECT; the first: line {first.line}: {first.code}: "
                f"{first.message}",
                report,
            )

    def _near_duplicates(self, kept: int) -> tuple[set[int], UnionFind]:
        """Records removed as near duplicates, and clusters (exact and near duplicates together)
        that the split keeps on one side."""
        clusters = UnionFind(kept)
        for first, second in self._exact_links:
            clusters.union(first, second)
        if kept < 2:
            return set(), clusters
        signatures = SignatureFile(self._signatures_path, kept)
        with self._spool_path.open("rb") as spool:

            def shingles(index: int) -> np.ndarray[Any, Any]:
                spool.seek(self._offsets[index])
                entry = orjson.loads(spool.readline())
                return self._hasher.shingles([_text_of(stored_record(entry))])[0]

            def exact(first: int, second: int) -> float:
                return jaccard(shingles(first), shingles(second))

            pairs = list(near_pairs(signatures, self.options.near_duplicate_threshold, exact=exact))
        for pair in pairs:
            clusters.union(pair.first, pair.second)
        if not self.options.remove_near_duplicates:
            return set(), clusters
        removed = {i for i in range(kept) if clusters.find(i) != i}
        examples = sorted(pairs, key=lambda p: (p.first, p.second))[:MAX_DUPLICATE_EXAMPLES]
        self._cleaning.near_duplicates_removed = len(removed)
        self._cleaning.near_duplicate_examples = [
            {
                "kept_line": self._lines[p.first],
                "removed_line": self._lines[p.second],
                "similarity": round(p.similarity, 4),
            }
            for p in examples
        ]
        return removed, clusters

    def _split(self, final: list[int], clusters: UnionFind) -> set[int]:
        """The records on the validation side: whole clusters, picked in an order given by a hash
        of the seed and each cluster's content, until the fraction is reached."""
        if self.options.validation_dataset or self.options.validation_fraction <= 0:
            return set()
        members: dict[int, list[int]] = {}
        for index in final:
            members.setdefault(clusters.find(index), []).append(index)
        seed = self.options.split_seed.to_bytes(8, "little", signed=True)

        def rank(root: int) -> bytes:
            return hashlib.blake2b(
                seed + bytes(self._keys[root * 16 : root * 16 + 16]), digest_size=8
            ).digest()

        target = math.floor(len(final) * self.options.validation_fraction + 0.5)
        chosen: set[int] = set()
        for root in sorted(members, key=rank):
            if len(chosen) >= target:
                break
            if len(chosen) + len(members[root]) > target and chosen:
                continue  # a cluster too big for what is left stays on the train side
            chosen.update(members[root])
        if len(chosen) == len(final):  # never leave the train side empty
            chosen.clear()
        return chosen

    def _write_final(
        self, final: list[int], validation_side: set[int], path: Path
    ) -> tuple[str, dict[str, Any] | None]:
        digest = hashlib.sha256()
        lengths: list[tuple[int, int]] = []
        batch: list[Record] = []
        with self._spool_path.open("rb") as spool, path.open("wb") as out:
            for position, index in enumerate(final):
                spool.seek(self._offsets[index])
                entry = orjson.loads(spool.readline())
                record = {
                    "index": position,
                    **stored_record(entry).document(),
                    "redacted_pii": entry["redacted_pii"],
                    "source_line": entry["line"],
                    "split": "validation" if index in validation_side else "train",
                }
                line = orjson.dumps(record, option=orjson.OPT_SORT_KEYS) + b"\n"
                digest.update(line)
                out.write(line)
                if self._count_tokens is not None:
                    batch.append(stored_record(entry))
                    if len(batch) == 256:
                        lengths += self._measure(batch)
                        batch.clear()
        if self._count_tokens is not None and batch:
            lengths += self._measure(batch)
        stats = _token_statistics(lengths, self.options) if self._count_tokens else None
        return digest.hexdigest(), stats

    def _measure(self, records: list[Record]) -> list[tuple[int, int]]:
        """Tokens (all, trainable) of each record: its conversation, or its prompt with each of
        its answers, summed."""
        assert self._count_tokens is not None
        sequences = [
            [record.messages + answer for answer in record.parts()[1:]] or [record.messages]
            for record in records
        ]
        measured = iter(self._count_tokens([s for each in sequences for s in each]))
        lengths = []
        for each in sequences:
            counts = [next(measured) for _ in each]
            lengths.append((sum(c[0] for c in counts), sum(c[1] for c in counts)))
        return lengths

    def close(self) -> None:
        """Remove the working files (the spool, signatures, the records file)."""
        for handle in (self._spool, self._signatures):
            handle.close()
        shutil.rmtree(self.workdir, ignore_errors=True)
        self._owner.close()


def stored_record(entry: dict[str, Any]) -> Record:
    """The record of a spooled entry."""
    return Record(
        entry["messages"],
        chosen=entry.get("chosen"),
        rejected=entry.get("rejected"),
        completion=entry.get("completion"),
        desirable=entry.get("desirable"),
        tools=entry.get("tools"),
        cluster=entry.get("cluster"),
    )


def prompt_key(record: Record) -> bytes:
    """The exact key (case and whitespace aside) of a record's prompt: a preference record's
    `messages`, a conversation's turns before its last assistant turn."""
    turns = record.messages
    if record.chosen is None and record.completion is None:
        last = max((i for i, m in enumerate(turns) if m["role"] == "assistant"), default=len(turns))
        turns = turns[:last]
    return exact_key([_with_calls(m) for m in turns])


def _turns(record: Record) -> list[Message]:
    """All of a record's turns, each answer's marked as such, with its tools and calls (for its
    exact-duplicate key)."""
    turns = [_with_calls(m) for m in record.messages]
    if record.tools:
        turns.append({"role": "tools", "content": orjson.dumps(record.tools).decode()})
    for name, part in (("chosen", record.chosen), ("rejected", record.rejected)):
        turns += [{**_with_calls(m), "role": f"{name}:{m['role']}"} for m in part or []]
    if record.completion is not None:
        label = "desirable" if record.desirable else "undesirable"
        turns += [{**_with_calls(m), "role": f"{label}:{m['role']}"} for m in record.completion]
    return turns


def _with_calls(message: Message) -> Message:
    """The message with its calls in its content (what makes it differ from another)."""
    if not message.get("tool_calls"):
        return message
    calls = orjson.dumps(message["tool_calls"], option=orjson.OPT_SORT_KEYS).decode()
    return {**message, "content": f"{message['content']}\n{calls}"}


def _text_of(record: Record) -> str:
    return "\n".join(_with_calls(m)["content"] for part in record.parts() for m in part)


def _token_statistics(lengths: list[tuple[int, int]], options: IngestOptions) -> dict[str, Any]:
    totals = np.asarray([t for t, _ in lengths], dtype=np.int64)
    return {
        "tokenizer_model": options.tokenizer_model,
        "total_tokens": int(totals.sum()),
        "trainable_tokens": int(sum(trainable for _, trainable in lengths)),
        "tokens_per_record": {
            "min": int(totals.min()),
            "mean": float(totals.mean()),
            "p50": int(np.percentile(totals, 50, method="nearest")),
            "p95": int(np.percentile(totals, 95, method="nearest")),
            "max": int(totals.max()),
        },
        "max_sequence_length": options.max_sequence_length,
        "records_over_max_length": int((totals > options.max_sequence_length).sum()),
    }
