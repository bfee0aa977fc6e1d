"""AdapterService in the SDK: adapters, immutable versions, movable aliases, downloads."""

from __future__ import annotations

import builtins
import hashlib
import os
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path

from tunefleet.client.core import (
    Call,
    Emit,
    Feed,
    M,
    Open,
    Program,
    Read,
    Resource,
    operation,
    pages,
    stream,
)
from tunefleet.client.errors import DataLoss
from tunefleet.client.helpers import CHUNK_BYTES, Progress, resource_name
from tunefleet.v1 import adapter_pb2, adapter_service_pb2, adapter_service_pb2_grpc


class Adapters(Resource[M]):
    """AdapterService: adapters, their immutable versions and movable aliases."""

    Stub = adapter_service_pb2_grpc.AdapterServiceStub

    @operation
    def create(
        self,
        adapter_id: str,
        *,
        base_model: str,
        description: str = "",
        labels: Mapping[str, str] | None = None,
        request_id: str = "",
    ) -> Program[adapter_pb2.Adapter]:
        """Create an adapter (a named line of versions) for a base model. Training jobs create
        their target adapter themselves when it does not exist.

        Example::

            adapter = client.adapters.create("orders", base_model="smollm2-135m-instruct")
        """
        request = adapter_service_pb2.CreateAdapterRequest(
            adapter=adapter_pb2.Adapter(
                base_model=base_model, description=description, labels=labels
            ),
            adapter_id=adapter_id,
            request_id=request_id or str(uuid.uuid4()),
        )
        adapter: adapter_pb2.Adapter = yield Call(
            self.Stub, "CreateAdapter", request, idempotent=True
        )
        return adapter

    @operation
    def get(self, name: str) -> Program[adapter_pb2.Adapter]:
        """An adapter by name (`adapters/{id}` or the id), with its aliases and latest version.

        Example::

            adapter = client.adapters.get("orders")
            print(adapter.aliases["prod"])
        """
        request = adapter_service_pb2.GetAdapterRequest(name=resource_name("adapters", name))
        adapter: adapter_pb2.Adapter = yield Call(self.Stub, "GetAdapter", request, idempotent=True)
        return adapter

    @stream
    def list(
        self,
        filter: str = "",
        page_size: int = 100,
    ) -> Feed[adapter_pb2.Adapter]:
        """Every adapter matching `filter` (such as `base_model=smollm2-135m-instruct`).

        Example::

            for adapter in client.adapters.list():
                print(adapter.name, adapter.latest_version)
        """
        request = adapter_service_pb2.ListAdaptersRequest(page_size=page_size, filter=filter)
        yield from pages(self.Stub, "ListAdapters", request, "adapters")

    @operation
    def delete(self, name: str) -> Program[None]:
        """Delete an adapter with its versions and aliases.

        Example::

            client.adapters.delete("orders")
        """
        request = adapter_service_pb2.DeleteAdapterRequest(name=resource_name("adapters", name))
        yield Call(self.Stub, "DeleteAdapter", request, idempotent=True)

    @stream
    def versions(
        self,
        adapter: str,
        filter: str = "",
        page_size: int = 100,
    ) -> Feed[adapter_pb2.AdapterVersion]:
        """Every version of an adapter, newest first.

        Example::

            for version in client.adapters.versions("orders"):
                print(version.version, version.lineage.metrics)
        """
        request = adapter_service_pb2.ListAdapterVersionsRequest(
            parent=resource_name("adapters", adapter), page_size=page_size, filter=filter
        )
        yield from pages(self.Stub, "ListAdapterVersions", request, "adapter_versions")

    @operation
    def get_version(self, name: str) -> Program[adapter_pb2.AdapterVersion]:
        """One version, `adapters/{adapter}/versions/{version}`.

        Example::

            version = client.adapters.get_version("adapters/orders/versions/2")
        """
        request = adapter_service_pb2.GetAdapterVersionRequest(name=name)
        version: adapter_pb2.AdapterVersion = yield Call(
            self.Stub, "GetAdapterVersion", request, idempotent=True
        )
        return version

    @operation
    def delete_version(self, name: str) -> Program[None]:
        """Delete a version (refused while an alias points at it).

        Example::

            client.adapters.delete_version("adapters/orders/versions/1")
        """
        request = adapter_service_pb2.DeleteAdapterVersionRequest(name=name)
        yield Call(self.Stub, "DeleteAdapterVersion", request, idempotent=True)

    @operation
    def upload_version(
        self,
        adapter: str,
        directory: str | os.PathLike[str],
        *,
        description: str = "",
        request_id: str = "",
        on_progress: Progress | None = None,
    ) -> Program[adapter_pb2.AdapterVersion]:
        """Upload a PEFT adapter folder (adapter_config.json, weights) as a new version; the
        server checks it against the base model before it is visible.

        Example::

            version = client.adapters.upload_version("orders", "out/adapter")
        """
        files = _version_files(Path(directory))
        total = sum(p.stat().st_size for p in files)

        def requests() -> Iterator[adapter_service_pb2.UploadAdapterVersionRequest]:
            Request = adapter_service_pb2.UploadAdapterVersionRequest
            yield Request(
                header=Request.Header(
                    parent=resource_name("adapters", adapter),
                    description=description,
                    request_id=request_id,
                )
            )
            done = 0
            for path in files:
                data = path.read_bytes()
                yield Request(
                    file=adapter_pb2.AdapterFile(
                        path=path.relative_to(directory).as_posix(),
                        size_bytes=len(data),
                        sha256=hashlib.sha256(data).hexdigest(),
                    )
                )
                for start in range(0, len(data), CHUNK_BYTES):
                    yield Request(chunk=data[start : start + CHUNK_BYTES])
                    done += len(data[start : start + CHUNK_BYTES])
                    if on_progress:
                        on_progress(done, total)
            yield Request(finish_write=True)

        version: adapter_pb2.AdapterVersion = yield Call(
            self.Stub, "UploadAdapterVersion", requests()
        )
        return version

    @operation
    def register_version(
        self,
        adapter: str,
        files: Mapping[str, str],
        *,
        description: str = "",
        lineage: adapter_pb2.Lineage | None = None,
        request_id: str = "",
    ) -> Program[adapter_pb2.AdapterVersion]:
        """Register files already in the server's blob store (path in the version -> blob URI,
        as a trainer writes them) as a new version, checked like an upload.

        Example::

            version = client.adapters.register_version(
                "orders", {"adapter_config.json": uri_of_config, "adapter_model.safetensors": uri}
            )
        """
        request = adapter_service_pb2.CreateAdapterVersionRequest(
            parent=resource_name("adapters", adapter),
            files=[adapter_pb2.AdapterFile(path=path, uri=uri) for path, uri in files.items()],
            description=description,
            lineage=lineage,
            request_id=request_id or str(uuid.uuid4()),
        )
        version: adapter_pb2.AdapterVersion = yield Call(
            self.Stub, "CreateAdapterVersion", request, idempotent=True
        )
        return version

    @operation
    def download(
        self,
        version: str,
        directory: str | os.PathLike[str],
        *,
        on_progress: Progress | None = None,
    ) -> Program[builtins.list[Path]]:
        """Download a version's files into `directory` (created if needed), checking each file's
        size and sha256; returns the paths written.

        Example::

            paths = client.adapters.download("adapters/orders/versions/2", "orders-v2")
        """
        target = Path(directory)
        request = adapter_service_pb2.DownloadAdapterVersionRequest(name=version)
        responses = yield Open(self.Stub, "DownloadAdapterVersion", request)
        written: builtins.list[Path] = []
        current: adapter_pb2.AdapterFile | None = None
        digest, size, done, out = hashlib.sha256(), 0, 0, None
        try:
            while True:
                response = yield Read(responses)
                if response is None or response.HasField("file"):
                    if current is not None and out is not None:
                        out.close()
                        _check_file(current, size, digest.hexdigest())
                    if response is None:
                        return written
                    current, digest, size = response.file, hashlib.sha256(), 0
                    path = (target / current.path).resolve()
                    if not path.is_relative_to(target.resolve()):
                        raise DataLoss(f"the server sent a file outside the folder: {current.path}")
                    path.parent.mkdir(parents=True, exist_ok=True)
                    out = path.open("wb")
                    written.append(path)
                    continue
                if out is None:
                    raise DataLoss("the server sent bytes before naming their file")
                out.write(response.chunk)
                digest.update(response.chunk)
                size += len(response.chunk)
                done += len(response.chunk)
                if on_progress:
                    on_progress(done, None)
        finally:
            if out is not None:
                out.close()

    @operation
    def set_alias(
        self,
        adapter: str,
        alias: str,
        version: str | int,
        *,
        reason: str = "",
        expected_version: str | int | None = None,
    ) -> Program[adapter_pb2.AdapterAlias]:
        """Point `alias` of `adapter` at `version` (a number or a version name). With
        `expected_version` (the same) the move is a compare-and-set (ABORTED when someone else
        moved it; "" means the alias must not exist yet). Servers routing the alias follow it
        at once.

        Example::

            client.adapters.set_alias("orders", "prod", 2, reason="better exact match")
        """
        parent = resource_name("adapters", adapter)
        request = adapter_service_pb2.SetAdapterAliasRequest(
            name=f"{parent}/aliases/{alias}", version=_version_name(parent, version), reason=reason
        )
        if expected_version is not None:
            request.expected_version = (
                _version_name(parent, expected_version) if expected_version != "" else ""
            )
        moved: adapter_pb2.AdapterAlias = yield Call(
            self.Stub, "SetAdapterAlias", request, expected_version is not None
        )
        return moved

    @operation
    def set_canary(
        self, adapter: str, alias: str, canary: str, percent: int, *, reason: str = ""
    ) -> Program[adapter_pb2.AdapterAlias]:
        """Send `percent` (1 to 99) of the requests for `alias` to the version of alias `canary`
        (0 removes the canary). Servers routing the alias follow it at once.

        Example::

            client.adapters.set_canary("orders", "prod", "candidate", 10, reason="canary")
        """
        request = adapter_service_pb2.SetAdapterAliasCanaryRequest(
            name=f"{resource_name('adapters', adapter)}/aliases/{alias}",
            canary=adapter_pb2.AliasCanary(alias=canary, percent=percent),
            reason=reason,
        )
        changed: adapter_pb2.AdapterAlias = yield Call(
            self.Stub, "SetAdapterAliasCanary", request, idempotent=True
        )
        return changed

    @operation
    def delete_alias(self, adapter: str, alias: str, *, reason: str = "") -> Program[None]:
        """Delete an alias; servers stop routing it.

        Example::

            client.adapters.delete_alias("orders", "canary")
        """
        name = f"{resource_name('adapters', adapter)}/aliases/{alias}"
        request = adapter_service_pb2.DeleteAdapterAliasRequest(name=name, reason=reason)
        yield Call(self.Stub, "DeleteAdapterAlias", request, idempotent=True)

    @stream
    def aliases(self, adapter: str, page_size: int = 100) -> Feed[adapter_pb2.AdapterAlias]:
        """The adapter's aliases.

        Example::

            for alias in client.adapters.aliases("orders"):
                print(alias.name, alias.version)
        """
        request = adapter_service_pb2.ListAdapterAliasesRequest(
            parent=resource_name("adapters", adapter), page_size=page_size
        )
        yield from pages(self.Stub, "ListAdapterAliases", request, "aliases")

    @stream
    def alias_moves(self, adapter: str, page_size: int = 100) -> Feed[adapter_pb2.AliasMove]:
        """The audit trail of the adapter's alias moves, newest first.

        Example::

            for move in client.adapters.alias_moves("orders"):
                print(move.alias, move.from_version, "->", move.to_version, move.reason)
        """
        request = adapter_service_pb2.ListAliasMovesRequest(
            parent=resource_name("adapters", adapter), page_size=page_size
        )
        yield from pages(self.Stub, "ListAliasMoves", request, "alias_moves")

    @stream
    def watch(
        self, *, after_revision: int = 0, adapter: str = ""
    ) -> Feed[adapter_pb2.AdapterChange]:
        """Registry changes (versions added, aliases moved, deletions) after `after_revision`,
        then new ones as they happen; optionally of one adapter.

        Example::

            for change in client.adapters.watch(adapter="orders"):
                print(change.type, change.alias, change.version)
        """
        request = adapter_service_pb2.WatchAdapterChangesRequest(
            after_revision=after_revision,
            adapter=resource_name("adapters", adapter) if adapter else "",
        )
        changes = yield Open(self.Stub, "WatchAdapterChanges", request)
        while (change := (yield Read(changes))) is not None:
            yield Emit(change)

    @operation
    def merge(
        self, version: str, *, dtype: str = "", request_id: str = ""
    ) -> Program[adapter_pb2.AdapterVersion]:
        """Merge a version into its base model's weights, stored as a new full-model version.

        Example::

            merged = client.adapters.merge("adapters/orders/versions/2", dtype="bfloat16")
        """
        request = adapter_service_pb2.MergeAdapterVersionRequest(
            name=version, dtype=dtype, request_id=request_id or str(uuid.uuid4())
        )
        merged: adapter_pb2.AdapterVersion = yield Call(
            self.Stub, "MergeAdapterVersion", request, idempotent=True
        )
        return merged

    @operation
    def quantize(
        self,
        version: str,
        format: str | adapter_pb2.ExportFormat.ValueType,
        *,
        min_top1_agreement: float = 0.0,
        keep_failed_export: bool = False,
        request_id: str = "",
    ) -> Program[adapter_pb2.AdapterVersion]:
        """Export a version (an adapter is merged into its base model first) in `format`
        (`gguf-q8_0`, `EXPORT_FORMAT_GGUF_Q8_0` or the enum), checked against the full model: a
        new version, refused (FailedPrecondition, reason EXPORT_CHECK_FAILED) when its top-1
        agreement is under the tolerance, unless `keep_failed_export`.

        Example::

            q8 = client.adapters.quantize("adapters/orders@prod", "gguf-q8_0")
            print(q8.export_check.top1_agreement)
            client.adapters.download(q8.name, "orders-gguf")
        """
        request = adapter_service_pb2.QuantizeModelVersionRequest(
            name=version,
            format=export_format(format),
            min_top1_agreement=min_top1_agreement,
            keep_failed_export=keep_failed_export,
            request_id=request_id or str(uuid.uuid4()),
        )
        exported: adapter_pb2.AdapterVersion = yield Call(
            self.Stub, "QuantizeModelVersion", request, idempotent=True
        )
        return exported


def export_format(
    value: str | adapter_pb2.ExportFormat.ValueType,
) -> adapter_pb2.ExportFormat.ValueType:
    """`gguf-q8_0` (the CLI's spelling) or `EXPORT_FORMAT_GGUF_Q8_0` as the enum; ValueError
    naming the formats otherwise."""
    if not isinstance(value, str):
        return value
    name = value if value.startswith("EXPORT_FORMAT_") else "EXPORT_FORMAT_" + value.upper()
    try:
        return adapter_pb2.ExportFormat.Value(name.replace("-", "_"))
    except ValueError:
        raise ValueError(f"format: {value!r} is not one of {', '.join(EXPORT_FORMATS)}") from None


# The formats as the CLI spells them: gguf-f16, gguf-q8_0, gguf-q4_0.
EXPORT_FORMATS = tuple(
    value.name.removeprefix("EXPORT_FORMAT_").lower().replace("_", "-", 1)
    for value in adapter_pb2.ExportFormat.DESCRIPTOR.values
    if value.number
)


def _check_file(file: adapter_pb2.AdapterFile, size: int, sha256: str) -> None:
    if file.size_bytes and size != file.size_bytes:
        raise DataLoss(f"{file.path}: received {size} bytes, expected {file.size_bytes}")
    if file.sha256 and sha256 != file.sha256:
        raise DataLoss(f"{file.path}: sha256 {sha256} does not match {file.sha256}")


def _version_name(parent: str, version: str | int) -> str:
    """A version number (as int or digits) as the full name under `parent`; names as given."""
    if isinstance(version, int) or version.isdigit():
        return f"{parent}/versions/{int(version)}"
    return version


def _version_files(directory: Path) -> list[Path]:
    """The files of a version folder. A link is followed only when its target is inside the
    folder: a link out of it (a README pointing at a secret) would upload the target."""
    root = directory.resolve()
    if not root.is_dir():
        raise ValueError(f"{directory} is not a folder")
    files = []
    for path in sorted(directory.rglob("*")):
        target = path.resolve()
        if not target.is_relative_to(root):
            raise ValueError(f"{path} links outside {directory} (to {target}): not uploaded")
        if target.is_file():
            files.append(path)
    return files
