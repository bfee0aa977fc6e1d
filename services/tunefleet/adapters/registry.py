"""The adapter registry's logic, free of gRPC."""

from __future__ import annotations

import hashlib
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from sqlalchemy import delete, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from tunefleet.adapters import validation
from tunefleet.adapters.store import (
    AdapterRow,
    AliasMoveRow,
    AliasRow,
    VersionDatasetRow,
    VersionRow,
)
from tunefleet.core import names
from tunefleet.core.errors import (
    Aborted,
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    ResourceExhausted,
)
from tunefleet.runtime.models import ModelCatalogue
from tunefleet.storage import idempotency, spools
from tunefleet.storage.blobs import BlobInfo, BlobStore, uri_sha256
from tunefleet.storage.changes import Change, append_change, latest_revision, read_changes
from tunefleet.storage.database import Database, utcnow
from tunefleet.storage.filtering import Filter
from tunefleet.storage.pagination import Page, paginate

TOPIC = "adapters"
CONFIG_LIMIT = 1024 * 1024


@dataclass(frozen=True)
class RegistrySettings:
    max_file_bytes: int = 20 * 1024**3
    max_version_bytes: int = 50 * 1024**3
    vllm_max_lora_rank: int = 64
    smoke_test: bool = True


@dataclass
class Hooks:
    """Work done with torch and PEFT (smoke test, merge), optional where they are missing."""

    smoke_test: Callable[[Path, Path], dict[str, Any]] | None = None
    merge: Callable[[Path, Path, Path, str], None] | None = None


@dataclass
class VersionUpload:
    """A version being uploaded: files land in a staging directory until `finish`."""

    adapter: str
    description: str
    lineage: dict[str, Any]
    staging: Path
    request_id: str = ""
    request_sha256: str = ""
    files: dict[str, int] = field(default_factory=dict)
    total: int = 0
    _current: str | None = None
    _handle: IO[bytes] | None = None
    _owner: IO[str] | None = None  # the spool's lock (storage.spools)
    _expected: dict[str, tuple[int, str]] = field(default_factory=dict)
    _hashes: dict[str, Any] = field(default_factory=dict)


class Registry:
    def __init__(
        self,
        db: Database,
        blobs: BlobStore,
        *,
        workdir: Path,
        models: ModelCatalogue | None = None,
        settings: RegistrySettings | None = None,
        hooks: Hooks | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.db, self.blobs, self.workdir = db, blobs, workdir
        self.models = models or ModelCatalogue()
        self.settings = settings or RegistrySettings()
        self.hooks = hooks or Hooks()
        self.on_change = on_change or (lambda: None)

    # --- adapters ------------------------------------------------------------------------------

    def create_adapter(
        self,
        adapter_id: str,
        base_model: str,
        description: str,
        labels: dict[str, str],
        request_id: str = "",
    ) -> AdapterRow:
        names.check_id(adapter_id, "adapter_id")
        if not base_model:
            raise InvalidArgument("adapter.base_model", "is required")
        fingerprint = hashlib.sha256(
            repr((adapter_id, base_model, description, sorted(labels.items()))).encode()
        ).hexdigest()

        def create(session: Session) -> str:
            if session.get(AdapterRow, adapter_id) is not None:
                raise AlreadyExists(f"adapters/{adapter_id} already exists")
            now = utcnow()
            session.add(
                AdapterRow(
                    id=adapter_id,
                    base_model=base_model,
                    description=description,
                    labels=dict(labels),
                    latest_version=0,
                    create_time=now,
                    update_time=now,
                )
            )
            session.flush()
            append_change(
                session, TOPIC, "TYPE_ADAPTER_CREATED", {"adapter": f"adapters/{adapter_id}"}
            )
            return f"adapters/{adapter_id}"

        name, _ = idempotency.create_once(
            self.db,
            scope="CreateAdapter",
            request_id=request_id,
            request_sha256=fingerprint,
            create=create,
        )
        self.on_change()
        return self.get_adapter(name)

    def get_adapter(self, name: str) -> AdapterRow:
        with self.db.read() as session:
            return _adapter(session, names.adapter_id(name))

    def aliases_of(self, adapter: str) -> dict[str, int]:
        with self.db.read() as session:
            rows = session.scalars(select(AliasRow).where(AliasRow.adapter_id == adapter))
            return {row.alias: row.version for row in rows}

    def list_adapters(self, filter_text: str, page_size: int, page_token: str) -> Page[AdapterRow]:
        adapter_filter = Filter({"base_model": AdapterRow.base_model}, labels=AdapterRow.labels)
        with self.db.read() as session:
            statement = adapter_filter.apply(select(AdapterRow), filter_text)
            return paginate(
                session,
                statement,
                [AdapterRow.id],
                page_size=page_size,
                page_token=page_token,
                query=filter_text,
            )

    def delete_adapter(self, name: str) -> None:
        adapter = names.adapter_id(name)
        with self.db.session() as session:
            _adapter(session, adapter)
            aliases = session.scalars(
                select(AliasRow.alias).where(AliasRow.adapter_id == adapter)
            ).all()
            if aliases:
                listed = ", ".join(sorted(aliases))
                raise FailedPrecondition(
                    f"adapters/{adapter} has aliases ({listed}); delete them first",
                    reason="ADAPTER_HAS_ALIASES",
                )
            versions = session.scalars(
                select(VersionRow).where(VersionRow.adapter_id == adapter)
            ).all()
            shas = {f["sha256"] for v in versions for f in v.files["files"]}
            session.execute(delete(VersionRow).where(VersionRow.adapter_id == adapter))
            session.execute(delete(AdapterRow).where(AdapterRow.id == adapter))
            append_change(session, TOPIC, "TYPE_ADAPTER_DELETED", {"adapter": name})
        self._delete_unreferenced(shas)
        self.on_change()

    # --- versions ------------------------------------------------------------------------------

    def begin_upload(
        self,
        parent: str,
        description: str,
        lineage: dict[str, Any],
        request_id: str = "",
        request_sha256: str = "",
    ) -> VersionUpload:
        adapter = names.adapter_id(parent, "header.parent")
        self.get_adapter(parent)
        staging = self.workdir / f"upload-{uuid.uuid4().hex}"
        staging.mkdir(parents=True)
        upload = VersionUpload(
            adapter, description, _check_lineage(lineage), staging, request_id, request_sha256
        )
        upload._owner = spools.hold(staging)
        return upload

    def existing_for(self, upload: VersionUpload) -> VersionRow | None:
        """The version an earlier upload with the same request id created, if any."""
        if not upload.request_id:
            return None
        request_id = idempotency.check_request_id(upload.request_id)
        with self.db.session() as session:
            name = idempotency.lookup(
                session, "UploadAdapterVersion", request_id, upload.request_sha256
            )
        return self.get_version(name) if name else None

    def start_file(self, upload: VersionUpload, path: str, size_bytes: int, sha256: str) -> None:
        self._end_file(upload)
        validation.check_path(path)
        if path in upload.files:
            raise validation.refuse(path, "DUPLICATE_FILE", "the file was sent twice")
        if size_bytes > self.settings.max_file_bytes:
            raise self._too_large(path, size_bytes)
        target = upload.staging / path
        target.parent.mkdir(parents=True, exist_ok=True)
        upload._current, upload._handle = path, target.open("wb")
        upload._hashes[path] = hashlib.sha256()
        upload.files[path] = 0
        if size_bytes or sha256:
            upload._expected[path] = (size_bytes, sha256)

    def write(self, upload: VersionUpload, chunk: bytes) -> None:
        if upload._handle is None or upload._current is None:
            raise InvalidArgument("file", "a chunk must follow a file message")
        path = upload._current
        upload.files[path] += len(chunk)
        upload.total += len(chunk)
        if upload.files[path] > self.settings.max_file_bytes:
            raise self._too_large(path, upload.files[path])
        if upload.total > self.settings.max_version_bytes:
            raise ResourceExhausted(
                f"the version exceeds {self.settings.max_version_bytes} bytes",
                reason="VERSION_TOO_LARGE",
            )
        upload._hashes[path].update(chunk)
        upload._handle.write(chunk)

    def _end_file(self, upload: VersionUpload) -> None:
        if upload._handle is None or upload._current is None:
            return
        upload._handle.close()
        path = upload._current
        upload._handle = upload._current = None
        size, sha256 = upload._expected.get(path, (0, ""))
        actual = upload._hashes[path].hexdigest()
        if size and size != upload.files[path]:
            raise validation.refuse(
                path, "SIZE_MISMATCH", f"declared {size} bytes, received {upload.files[path]}"
            )
        if sha256 and sha256 != actual:
            raise validation.refuse(
                path, "CHECKSUM_MISMATCH", f"declared sha256 {sha256}, received {actual}"
            )

    def finish_upload(self, upload: VersionUpload) -> VersionRow:
        self._end_file(upload)
        if not upload.files:
            raise InvalidArgument("file", "the upload contains no files")
        staged = {path: upload.staging / path for path in upload.files}
        return self._register(
            upload.adapter,
            staged,
            None,
            upload.description,
            upload.lineage,
            scope=("UploadAdapterVersion", upload.request_id, upload.request_sha256),
        )

    def abort_upload(self, upload: VersionUpload) -> None:
        if upload._handle is not None:
            upload._handle.close()
        shutil.rmtree(upload.staging, ignore_errors=True)
        if upload._owner is not None:
            upload._owner.close()

    def register(
        self,
        parent: str,
        files: list[dict[str, Any]],
        description: str,
        lineage: dict[str, Any],
        request_id: str = "",
    ) -> VersionRow:
        """A version from files already in the blob store (`uri` names the blob)."""
        adapter = names.adapter_id(parent, "parent")
        if not files:
            raise InvalidArgument("files", "at least one file is required")
        blob_files: dict[str, BlobInfo] = {}
        for index, entry in enumerate(files):
            path = validation.check_path(entry["path"])
            sha256 = uri_sha256(entry.get("uri", ""))
            if sha256 is None:
                raise InvalidArgument(f"files[{index}].uri", "must name a blob of this store")
            try:
                info = self.blobs.stat(sha256)
            except NotFound:
                raise InvalidArgument(f"files[{index}].uri", f"no blob {sha256}") from None
            if entry.get("sha256") and entry["sha256"] != info.sha256:
                raise validation.refuse(path, "CHECKSUM_MISMATCH", "sha256 differs from the blob's")
            if entry.get("size_bytes") and entry["size_bytes"] != info.size:
                raise validation.refuse(path, "SIZE_MISMATCH", "size differs from the blob's")
            blob_files[path] = info
        fingerprint = hashlib.sha256(
            repr(
                (parent, sorted((p, i.sha256) for p, i in blob_files.items()), description)
            ).encode()
        ).hexdigest()
        return self._register(
            adapter,
            None,
            blob_files,
            description,
            _check_lineage(lineage),
            scope=("CreateAdapterVersion", request_id, fingerprint),
        )

    def _register(
        self,
        adapter: str,
        staged: dict[str, Path] | None,
        blob_files: dict[str, BlobInfo] | None,
        description: str,
        lineage: dict[str, Any],
        *,
        scope: tuple[str, str, str],
        merged_from: str = "",
    ) -> VersionRow:
        scope_name, request_id, request_sha256 = scope
        if request_id:
            request_id = idempotency.check_request_id(request_id)
            with self.db.session() as session:
                existing = idempotency.lookup(session, scope_name, request_id, request_sha256)
            if existing:
                return self.get_version(existing)
        base_model = self.get_adapter(f"adapters/{adapter}").base_model
        local = self.workdir / f"check-{uuid.uuid4().hex}"
        try:
            if staged is None:
                assert blob_files is not None
                staged = self._materialise(blob_files, local)
            sizes = {path: file.stat().st_size for path, file in staged.items()}
            config_path = staged.get(validation.ADAPTER_CONFIG)
            config_text = config_path.read_bytes() if config_path else None
            if config_text is not None and len(config_text) > CONFIG_LIMIT:
                raise validation.refuse(validation.ADAPTER_CONFIG, "FILE_TOO_LARGE", "over 1 MiB")
            tensors = {
                path: _read_header(path, file)
                for path, file in staged.items()
                if path.endswith(".safetensors")
            }
            model_dir = self.models.find(base_model)
            modules = _modules(model_dir)
            analysis = validation.analyse(
                sizes, config_text, tensors, modules, self.settings.vllm_max_lora_rank
            )
            smoke = self._smoke(analysis, model_dir, staged)
            if blob_files is None:
                blob_files = {path: self.blobs.put_file(file) for path, file in staged.items()}
        finally:
            shutil.rmtree(local, ignore_errors=True)
        try:
            return self._commit(
                adapter,
                blob_files,
                analysis,
                smoke,
                description,
                lineage,
                scope_name,
                request_id,
                request_sha256,
                merged_from,
            )
        except IntegrityError:
            if not request_id:
                raise
            # A concurrent call with the same request id (a retry racing the first attempt)
            # committed first: its version is this call's answer too.
            with self.db.session() as session:
                existing = idempotency.lookup(session, scope_name, request_id, request_sha256)
            if existing is None:
                raise
            return self.get_version(existing)

    def _materialise(self, blob_files: dict[str, BlobInfo], directory: Path) -> dict[str, Path]:
        """Copies of the blobs that checks read (configuration, weights) in a local directory."""
        staged = {}
        for path, info in blob_files.items():
            target = directory / path
            target.parent.mkdir(parents=True, exist_ok=True)
            with target.open("wb") as out:
                for chunk in self.blobs.open(info.sha256):
                    out.write(chunk)
            staged[path] = target
        return staged

    def _smoke(
        self, analysis: validation.Analysis, model_dir: Path | None, staged: dict[str, Path]
    ) -> dict[str, Any]:
        if analysis.kind != "adapter":
            return {"result": "RESULT_SKIPPED", "message": "not an adapter"}
        if not self.settings.smoke_test or self.hooks.smoke_test is None:
            return {"result": "RESULT_SKIPPED", "message": "smoke tests are off on this server"}
        if model_dir is None or not any(model_dir.glob("*.safetensors")):
            return {
                "result": "RESULT_SKIPPED",
                "message": "base model weights are not available here",
            }
        adapter_dir = staged[validation.ADAPTER_CONFIG].parent
        try:
            result = self.hooks.smoke_test(model_dir, adapter_dir)
        except ImportError:
            return {"result": "RESULT_SKIPPED", "message": "torch and peft are not installed here"}
        if result["result"] == "RESULT_FAILED":
            raise validation.refuse(
                "adapter_model.safetensors",
                "NO_EFFECT",
                f"the adapter does not change the base model's output ({result['message']})",
            )
        return result

    def _commit(
        self,
        adapter: str,
        blob_files: dict[str, BlobInfo],
        analysis: validation.Analysis,
        smoke: dict[str, Any],
        description: str,
        lineage: dict[str, Any],
        scope: str,
        request_id: str,
        request_sha256: str,
        merged_from: str,
    ) -> VersionRow:
        files: list[dict[str, Any]] = [
            {"path": p, "size_bytes": i.size, "sha256": i.sha256}
            for p, i in sorted(blob_files.items())
        ]
        digest = hashlib.sha256("".join(i.sha256 for _, i in sorted(blob_files.items())).encode())
        serving_suffix = digest.hexdigest()[:8]
        with self.db.session() as session:
            version = session.execute(
                update(AdapterRow)
                .where(AdapterRow.id == adapter)
                .values(latest_version=AdapterRow.latest_version + 1, update_time=utcnow())
                .returning(AdapterRow.latest_version)
            ).scalar_one_or_none()
            if version is None:
                raise NotFound(f"adapters/{adapter} not found")
            row = VersionRow(
                adapter_id=adapter,
                version=version,
                kind=analysis.kind,
                description=description,
                files={"files": files},
                size_bytes=sum(f["size_bytes"] for f in files),
                config=analysis.config,
                compatibility={"engines": analysis.compatibility, "notes": analysis.notes},
                smoke_test=smoke,
                lineage=lineage,
                training_job=lineage.get("training_job", ""),
                serving_name=f"{adapter}-v{version}-{serving_suffix}",
                merged_from=merged_from,
                create_time=utcnow(),
            )
            session.add(row)
            session.flush()
            for dataset in sorted(set(lineage.get("datasets", []))):
                session.add(VersionDatasetRow(adapter_id=adapter, version=version, dataset=dataset))
            name = names.version_name(adapter, version)
            append_change(
                session,
                TOPIC,
                "TYPE_VERSION_CREATED",
                {"adapter": f"adapters/{adapter}", "version": name},
            )
            if request_id:
                idempotency.remember(session, scope, request_id, request_sha256, name)
        self.on_change()
        return row

    def get_version(self, name: str, field: str = "name") -> VersionRow:
        ref = names.version_ref(name, field)
        with self.db.read() as session:
            return _version(session, ref)

    def list_versions(
        self, parent: str, filter_text: str, page_size: int, page_token: str
    ) -> Page[VersionRow]:
        statement = select(VersionRow)
        if parent != "adapters/-":
            statement = statement.where(VersionRow.adapter_id == names.adapter_id(parent, "parent"))
        for term in filter(None, re.split(r"\s+AND\s+", filter_text.strip())):
            match = re.fullmatch(
                r'lineage\.(?P<field>\w+)\s*(?P<op>=|:)\s*"(?P<value>[^"]*)"', term
            )
            if match is None or (match["field"], match["op"]) not in (
                ("datasets", ":"),
                ("training_job", "="),
                ("base_model", "="),
            ):
                raise InvalidArgument(
                    "filter",
                    f"cannot filter on {term!r}; use "
                    'lineage.datasets:"datasets/x", lineage.training_job = "..." '
                    'or lineage.base_model = "..."',
                )
            if match["field"] == "datasets":
                statement = statement.where(
                    select(VersionDatasetRow)
                    .where(
                        VersionDatasetRow.adapter_id == VersionRow.adapter_id,
                        VersionDatasetRow.version == VersionRow.version,
                        VersionDatasetRow.dataset == match["value"],
                    )
                    .exists()
                )
            elif match["field"] == "training_job":
                statement = statement.where(VersionRow.training_job == match["value"])
            else:
                statement = statement.where(
                    VersionRow.lineage["base_model"].as_string() == match["value"]
                )
        with self.db.read() as session:
            return paginate(
                session,
                statement,
                [VersionRow.create_time, VersionRow.adapter_id, VersionRow.version],
                page_size=page_size,
                page_token=page_token,
                query=f"{parent}|{filter_text}",
                descending=True,
            )

    def aliases_pointing_at(self, row: VersionRow) -> list[str]:
        with self.db.read() as session:
            return list(
                session.scalars(
                    select(AliasRow.alias).where(
                        AliasRow.adapter_id == row.adapter_id, AliasRow.version == row.version
                    )
                )
            )

    def delete_version(self, name: str) -> None:
        ref = names.version_ref(name)
        with self.db.session() as session:
            row = _version(session, ref)
            aliases = session.scalars(
                select(AliasRow.alias).where(
                    AliasRow.adapter_id == row.adapter_id, AliasRow.version == row.version
                )
            ).all()
            if aliases:
                raise FailedPrecondition(
                    f"{names.version_name(row.adapter_id, row.version)} is the target of alias "
                    f"{', '.join(sorted(aliases))}; move or delete it first",
                    reason="VERSION_HAS_ALIASES",
                )
            shas = {f["sha256"] for f in row.files["files"]}
            session.delete(row)
            append_change(
                session,
                TOPIC,
                "TYPE_VERSION_DELETED",
                {
                    "adapter": f"adapters/{row.adapter_id}",
                    "version": names.version_name(row.adapter_id, row.version),
                },
            )
        self._delete_unreferenced(shas)
        self.on_change()

    def file_chunks(self, row: VersionRow, path: str) -> Iterator[bytes]:
        sha256 = next(f["sha256"] for f in row.files["files"] if f["path"] == path)
        return self.blobs.open(sha256)

    def _delete_unreferenced(self, shas: set[str]) -> None:
        if not shas:
            return
        with self.db.session() as session:
            used = {
                str(f["sha256"])
                for files in session.scalars(select(VersionRow.files))
                for f in files["files"]
            }
        for sha in shas - used:
            self.blobs.delete(sha)

    def _too_large(self, path: str, size: int) -> ResourceExhausted:
        return ResourceExhausted(
            f"files[{path!r}]: {size} bytes is over the limit of {self.settings.max_file_bytes}",
            reason="FILE_TOO_LARGE",
            metadata={"file": path},
        )

    # --- aliases -------------------------------------------------------------------------------

    def set_alias(
        self, name: str, version: str, reason: str, actor: str, expected_version: str | None = None
    ) -> AliasRow:
        adapter, alias = names.alias_name(name)
        target = names.version_ref(version, "version")
        if target.adapter != adapter:
            raise InvalidArgument("version", "must be a version of the alias's adapter")
        with self.db.session() as session:
            row = _version(session, target)
            current = session.execute(
                select(AliasRow)
                .where(AliasRow.adapter_id == adapter, AliasRow.alias == alias)
                .with_for_update()
            ).scalar_one_or_none()
            before = names.version_name(adapter, current.version) if current else ""
            if expected_version is not None and expected_version != before:
                raise Aborted(
                    f"{name} points at {before or 'nothing'}, not {expected_version or 'nothing'}",
                    reason="ALIAS_MOVED",
                    metadata={"current_version": before},
                )
            now = utcnow()
            if current is None:
                current = AliasRow(
                    adapter_id=adapter,
                    alias=alias,
                    version=row.version,
                    update_time=now,
                    updated_by=actor,
                )
                session.add(current)
            else:
                current.version, current.update_time, current.updated_by = row.version, now, actor
            session.flush()
            change = append_change(
                session,
                TOPIC,
                "TYPE_ALIAS_MOVED",
                {
                    "adapter": f"adapters/{adapter}",
                    "alias": name,
                    "version": names.version_name(adapter, row.version),
                    "previous_version": before,
                },
            )
            session.add(
                AliasMoveRow(
                    adapter_id=adapter,
                    alias=alias,
                    from_version=int(before.rsplit("/", 1)[1]) if before else None,
                    to_version=row.version,
                    time=now,
                    actor=actor,
                    reason=reason,
                    revision=change.revision,
                )
            )
        self.on_change()
        return current

    def delete_alias(self, name: str, reason: str, actor: str) -> None:
        adapter, alias = names.alias_name(name)
        with self.db.session() as session:
            current = session.execute(
                select(AliasRow)
                .where(AliasRow.adapter_id == adapter, AliasRow.alias == alias)
                .with_for_update()
            ).scalar_one_or_none()
            if current is None:
                raise NotFound(f"{name} not found")
            before = names.version_name(adapter, current.version)
            session.delete(current)
            change = append_change(
                session,
                TOPIC,
                "TYPE_ALIAS_DELETED",
                {"adapter": f"adapters/{adapter}", "alias": name, "previous_version": before},
            )
            session.add(
                AliasMoveRow(
                    adapter_id=adapter,
                    alias=alias,
                    from_version=current.version,
                    to_version=None,
                    time=utcnow(),
                    actor=actor,
                    reason=reason,
                    revision=change.revision,
                )
            )
        self.on_change()

    def list_aliases(self, parent: str, page_size: int, page_token: str) -> Page[AliasRow]:
        adapter = names.adapter_id(parent, "parent")
        with self.db.read() as session:
            _adapter(session, adapter)
            return paginate(
                session,
                select(AliasRow).where(AliasRow.adapter_id == adapter),
                [AliasRow.alias],
                page_size=page_size,
                page_token=page_token,
                query=parent,
            )

    def list_moves(self, parent: str, page_size: int, page_token: str) -> Page[AliasMoveRow]:
        if "/aliases/" in parent:
            adapter, alias = names.alias_name(parent, "parent")
        else:
            adapter, alias = names.adapter_id(parent, "parent"), None
        statement = select(AliasMoveRow).where(AliasMoveRow.adapter_id == adapter)
        if alias is not None:
            statement = statement.where(AliasMoveRow.alias == alias)
        with self.db.read() as session:
            return paginate(
                session,
                statement,
                [AliasMoveRow.id],
                page_size=page_size,
                page_token=page_token,
                query=parent,
                descending=True,
            )

    # --- watch ---------------------------------------------------------------------------------

    def latest_revision(self) -> int:
        """The revision of the newest change (0 before any)."""
        with self.db.read() as session:
            return latest_revision(session, TOPIC)

    def changes(self, after_revision: int, adapter: str = "", limit: int = 500) -> list[Change]:
        """Changes after a revision (of one adapter when given), oldest first."""
        with self.db.read() as session:
            changes = read_changes(session, TOPIC, after_revision, limit)
        if adapter:
            changes = [c for c in changes if c.payload.get("adapter") == adapter]
        return changes

    # --- merge ---------------------------------------------------------------------------------

    def merge(self, name: str, dtype: str, request_id: str = "") -> VersionRow:
        if dtype not in ("", "bfloat16", "float16", "float32"):
            raise InvalidArgument("dtype", f"{dtype!r} is not bfloat16, float16 or float32")
        row = self.get_version(name)
        if row.kind != "adapter":
            raise FailedPrecondition(f"{name} is already a full model")
        base_model = self.get_adapter(f"adapters/{row.adapter_id}").base_model
        model_dir = self.models.find(base_model)
        if model_dir is None or self.hooks.merge is None:
            raise FailedPrecondition(
                f"the base model {base_model!r} is not available on this server",
                reason="BASE_MODEL_UNAVAILABLE",
            )
        source = names.version_name(row.adapter_id, row.version)
        work = self.workdir / f"merge-{uuid.uuid4().hex}"
        try:
            adapter_dir = work / "adapter"
            self._materialise(
                {f["path"]: BlobInfo(f["sha256"], f["size_bytes"]) for f in row.files["files"]},
                adapter_dir,
            )
            merged = work / "merged"
            try:
                self.hooks.merge(model_dir, adapter_dir, merged, dtype)
            except ImportError:
                raise FailedPrecondition(
                    "merging needs torch and peft (the [train] extra) on this server",
                    reason="MERGE_UNAVAILABLE",
                ) from None
            staged = {
                str(p.relative_to(merged)): p for p in sorted(merged.rglob("*")) if p.is_file()
            }
            fingerprint = hashlib.sha256(f"{source}:{dtype}".encode()).hexdigest()
            return self._register(
                row.adapter_id,
                staged,
                None,
                f"{source} merged into {base_model}",
                row.lineage,
                scope=("MergeAdapterVersion", request_id, fingerprint),
                merged_from=source,
            )
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _adapter(session: Session, adapter: str) -> AdapterRow:
    row = session.get(AdapterRow, adapter)
    if row is None:
        raise NotFound(f"adapters/{adapter} not found", metadata={"name": f"adapters/{adapter}"})
    return row


def _version(session: Session, ref: names.VersionRef) -> VersionRow:
    number = ref.version
    if ref.alias is not None:
        alias = session.get(AliasRow, (ref.adapter, ref.alias))
        if alias is None:
            raise NotFound(f"adapters/{ref.adapter}@{ref.alias}: no such alias")
        number = alias.version
    row = session.get(VersionRow, (ref.adapter, number))
    if row is None:
        raise NotFound(f"{names.version_name(ref.adapter, number or 0)} not found")
    return row


def _read_header(path: str, file: Path) -> dict[str, validation.TensorInfo]:
    size = file.stat().st_size
    with file.open("rb") as handle:
        prefix = handle.read(8)
        length = validation.header_length(prefix)
        if length is not None and length <= validation.MAX_HEADER_BYTES + 8:
            prefix += handle.read(length - 8)
    return validation.parse_safetensors_header(path, prefix, size)


def _modules(model_dir: Path | None) -> dict[str, validation.ModuleInfo] | None:
    if model_dir is None or not (model_dir / "config.json").exists():
        return None
    try:
        return validation.base_modules(model_dir)
    except ImportError:  # torch is not installed: shapes cannot be checked
        return None


def _check_lineage(lineage: dict[str, Any]) -> dict[str, Any]:
    for index, dataset in enumerate(lineage.get("datasets", [])):
        if not re.fullmatch(r"datasets/[A-Za-z0-9_-]+", dataset):
            raise InvalidArgument(
                f"lineage.datasets[{index}]", f"{dataset!r} is not a dataset name"
            )
    job = lineage.get("training_job", "")
    if job and not re.fullmatch(r"trainingJobs/[A-Za-z0-9_-]+", job):
        raise InvalidArgument("lineage.training_job", f"{job!r} is not a training job name")
    return lineage
