"""New versions of an adapter: registered from uploaded files or files already in the blob
store, merged into the base model, or a merged model quantized for export; each checked
(adapter_config.json, safetensors headers against the base model's modules, engine compatibility,
a smoke test; an export against its source) before it is committed with its sha256 files and
lineage."""

from __future__ import annotations

import hashlib
import re
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from tunefleet.adapters import store, validation
from tunefleet.adapters.exports import FORMATS, Agreement
from tunefleet.adapters.gguf_export import ExportError
from tunefleet.adapters.peft_ops import QuantizedBase
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
    export_min_agreement: float = 0.95


# What engines make of each library's exports (an export is never served as an adapter).
SERVED_EXPORTS = {
    "gguf": {
        "SERVING_ENGINE_VLLM": "a GGUF file, for llama.cpp, Ollama or LM Studio",
        "SERVING_ENGINE_PEFT": "a GGUF file, for llama.cpp, Ollama or LM Studio",
    },
    "bitsandbytes": {
        "SERVING_ENGINE_VLLM": "bitsandbytes checkpoints are not checked with vLLM here",
        "SERVING_ENGINE_PEFT": "",  # served as a base model of its own
    },
}


@dataclass
class Hooks:
    """Work done with torch and PEFT (smoke test, merge), optional where they are missing."""

    smoke_test: Callable[[Path, Path], dict[str, Any]] | None = None
    merge: Callable[[Path, Path, Path, str], None] | None = None
    # (full model, output folder, ExportFormat name): writes the export (exports.write).
    quantize: Callable[[Path, Path, str], None] | None = None
    # (full model, export folder, format): how the export's next tokens agree with the full
    # model's (exports.check).
    check_export: Callable[[Path, Path, str], Agreement] | None = None


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
        export: dict[str, Any] | None = None,
    ) -> VersionRow:
        """A version of `staged` local files or of blobs already stored, checked first. An
        `export` (its format, source and check) is a quantized model: not checked as weights."""
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
            if export:
                library = FORMATS[export["format"]].library
                analysis = validation.Analysis(
                    "quantized_model",
                    compatibility=[
                        {"engine": engine, "compatible": not why, "reasons": [why] if why else []}
                        for engine, why in SERVED_EXPORTS[library].items()
                    ],
                    notes=["a quantized full model: served as a base model of its own, if at all"],
                )
            else:
                analysis = validation.analyse(
                    sizes,
                    config_text,
                    tensors,
                    _modules(model_dir),
                    self.settings.vllm_max_lora_rank,
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
                export or {},
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
        export: dict[str, Any],
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
                export=export,
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
            raise FailedPrecondition(f"{name} is not an adapter but a {row.kind.replace('_', ' ')}")
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
            self._materialise(_blobs(row), adapter_dir)
            merged = work / "merged"
            try:
                self.hooks.merge(model_dir, adapter_dir, merged, dtype)
            except ImportError:
                raise FailedPrecondition(
                    "merging needs torch and peft (the [train] extra) on this server",
                    reason="MERGE_UNAVAILABLE",
                ) from None
            except QuantizedBase as refused:
                raise FailedPrecondition(
                    f"{source} cannot be merged: {refused}", reason="BASE_MODEL_QUANTIZED"
                ) from None
            staged = _files(merged)
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

    def quantize(
        self,
        name: str,
        export_format: str,
        min_agreement: float = 0.0,
        keep_failed: bool = False,
        request_id: str = "",
    ) -> VersionRow:
        """A quantized export of a full-model version (of an adapter version: its merge into the
        base model, made now in the base's precision unless one exists), checked against it."""
        if export_format not in FORMATS:
            raise InvalidArgument(
                "format", f"{export_format or 'unset'}: one of {', '.join(FORMATS)} is required"
            )
        if not 0 <= min_agreement <= 1:
            raise InvalidArgument("min_top1_agreement", f"{min_agreement} is not in (0, 1]")
        tolerance = min_agreement or self.settings.export_min_agreement
        if self.hooks.quantize is None or self.hooks.check_export is None:
            raise FailedPrecondition(
                "exporting needs torch, transformers and gguf on this server",
                reason="EXPORT_UNAVAILABLE",
            )
        fingerprint = hashlib.sha256(
            f"{name}:{export_format}:{tolerance}:{keep_failed}".encode()
        ).hexdigest()
        if request_id:  # a retry: the first answer, without exporting again
            request_id = idempotency.check_request_id(request_id)
            with self.db.session() as session:
                existing = idempotency.lookup(
                    session, "QuantizeModelVersion", request_id, fingerprint
                )
            if existing:
                return self._get_version(existing)
        row = self._get_version(name)
        if row.kind == "quantized_model":
            raise FailedPrecondition(
                f"{names.version_name(row.adapter_id, row.version)} is already quantized: "
                f"quantize the full model it came from, {row.export['quantized_from']}",
                reason="ALREADY_QUANTIZED",
            )
        if row.kind == "adapter":
            row = self._merged(row)
        source = names.version_name(row.adapter_id, row.version)
        work = self.workdir / f"quantize-{uuid.uuid4().hex}"
        try:
            model_dir = work / "model"
            self._materialise(_blobs(row), model_dir)
            output = work / "export"
            try:
                self.hooks.quantize(model_dir, output, export_format)
            except ExportError as refused:  # the model's own limits
                raise FailedPrecondition(
                    f"{source} cannot be exported as {export_format}: {refused}",
                    reason="EXPORT_NOT_SUPPORTED",
                ) from None
            found = self.hooks.check_export(model_dir, output, export_format)
            check = {
                "result": "RESULT_PASSED",
                "top1_agreement": found.top1,
                "kl_divergence": found.kl,
                "positions": found.positions,
                "min_top1_agreement": tolerance,
            }
            if found.top1 < tolerance:
                if not keep_failed:
                    raise FailedPrecondition(
                        f"the {export_format} export of {source} agrees with it on "
                        f"{found.top1:.1%} of next tokens (KL "
                        f"{found.kl:.3g} nats over {found.positions} positions), "
                        f"under the tolerance of {tolerance:.1%}: not stored (keep_failed_export "
                        "stores it marked as failed)",
                        reason="EXPORT_CHECK_FAILED",
                        metadata={
                            "top1_agreement": f"{found.top1:.4f}",
                            "kl_divergence": f"{found.kl:.4g}",
                        },
                    )
                check["result"] = "RESULT_FAILED"
            return self.register_files(
                row.adapter_id,
                _files(output),
                None,
                f"{source} quantized to {export_format}",
                row.lineage,
                scope=("QuantizeModelVersion", request_id, fingerprint),
                export={"format": export_format, "quantized_from": source, "check": check},
            )
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _merged(self, adapter: VersionRow) -> VersionRow:
        """The newest full model merged from `adapter`, merged now if there is none (under a
        request id of its own, so that concurrent exports of one adapter merge it once)."""
        source = names.version_name(adapter.adapter_id, adapter.version)
        with self.db.read() as session:
            found = session.scalars(
                select(VersionRow)
                .where(VersionRow.adapter_id == adapter.adapter_id)
                .where(VersionRow.merged_from == source)
                .order_by(VersionRow.version.desc())
                .limit(1)
            ).first()
        if found is not None:
            return found
        # Serving names are unique for ever: a re-created adapter's version 1 gets another id.
        merge_id = uuid.uuid5(uuid.NAMESPACE_URL, f"{adapter.serving_name}#merge")
        return self.merge(source, "", str(merge_id))


def _blobs(row: VersionRow) -> dict[str, BlobInfo]:
    return {f["path"]: BlobInfo(f["sha256"], f["size_bytes"]) for f in row.files["files"]}


def _files(directory: Path) -> dict[str, Path]:
    """The files under `directory` by their path in it."""
    return {str(p.relative_to(directory)): p for p in sorted(directory.rglob("*")) if p.is_file()}


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
