"""New versions of an adapter: registered from uploaded files or files already in the blob
store, or merged into the base model; each checked (adapter_config.json, safetensors headers
against the base model's modules, engine compatibility, a smoke test) before it is committed with
its sha256 files and lineage."""

from __future__ import annotations

import hashlib
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import update
from sqlalchemy.exc import IntegrityError

from tunefleet.adapters import store, validation
from tunefleet.adapters.store import TOPIC, AdapterRow, VersionDatasetRow, VersionRow
from tunefleet.core import names
from tunefleet.core.errors import FailedPrecondition, InvalidArgument, NotFound
from tunefleet.runtime.models import ModelCatalogue
from tunefleet.storage import idempotency
from tunefleet.storage.blobs import BlobInfo, BlobStore, uri_sha256
from tunefleet.storage.changes import append_change
from tunefleet.storage.database import Database, utcnow

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


class Versions:
    def __init__(
        self,
        db: Database,
        blobs: BlobStore,
        workdir: Path,
        models: ModelCatalogue,
        settings: RegistrySettings,
        hooks: Hooks,
        on_change: Callable[[], None],
    ) -> None:
        self.db, self.blobs, self.workdir, self.models = db, blobs, workdir, models
        self.settings, self.hooks, self.on_change = settings, hooks, on_change

    def _get_version(self, name: str) -> VersionRow:
        with self.db.read() as session:
            return store.version(session, names.version_ref(name))

    def _base_model(self, adapter: str) -> str:
        with self.db.read() as session:
            return store.adapter(session, adapter).base_model

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
        return self.register_files(
            adapter,
            None,
            blob_files,
            description,
            check_lineage(lineage),
            scope=("CreateAdapterVersion", request_id, fingerprint),
        )

    def register_files(
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
                return self._get_version(existing)
        base_model = self._base_model(adapter)
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
            return self._get_version(existing)

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

    def merge(self, name: str, dtype: str, request_id: str = "") -> VersionRow:
        if dtype not in ("", "bfloat16", "float16", "float32"):
            raise InvalidArgument("dtype", f"{dtype!r} is not bfloat16, float16 or float32")
        row = self._get_version(name)
        if row.kind != "adapter":
            raise FailedPrecondition(f"{name} is already a full model")
        base_model = self._base_model(row.adapter_id)
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
            return self.register_files(
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


def check_lineage(lineage: dict[str, Any]) -> dict[str, Any]:
    for index, dataset in enumerate(lineage.get("datasets", [])):
        if not re.fullmatch(r"datasets/[A-Za-z0-9_-]+", dataset):
            raise InvalidArgument(
                f"lineage.datasets[{index}]", f"{dataset!r} is not a dataset name"
            )
    job = lineage.get("training_job", "")
    if job and not re.fullmatch(r"trainingJobs/[A-Za-z0-9_-]+", job):
        raise InvalidArgument("lineage.training_job", f"{job!r} is not a training job name")
    return lineage
