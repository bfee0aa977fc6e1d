"""AdapterService over gRPC: converts between protobuf and the AdapterManager, nothing more."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
from google.protobuf import empty_pb2, json_format

from tunefleet.adapters.manager import AdapterManager
from tunefleet.adapters.metrics import AdapterMetrics
from tunefleet.adapters.store import AdapterRow, AliasMoveRow, AliasRow, VersionRow
from tunefleet.adapters.uploads import VersionUpload
from tunefleet.core import names
from tunefleet.core.errors import InvalidArgument, ResourceExhausted
from tunefleet.core.protos import timestamp
from tunefleet.runtime.auth import ANONYMOUS, current_principal
from tunefleet.runtime.streams import ChangeFeed, UploadStream, UploadWorker
from tunefleet.v1 import adapter_pb2, adapter_service_pb2, adapter_service_pb2_grpc, common_pb2

Context = grpc.aio.ServicerContext[Any, Any]
CHUNK = 1024 * 1024
POLL_SECONDS = 1.0  # watchers also look for changes made by other processes this often


def _client(context: Context) -> str:
    """Who holds a stream: the caller's token subject, or its address when auth is off."""
    principal = current_principal.get()
    if principal is not ANONYMOUS:
        return f"subject:{principal.subject}"
    peer = context.peer() or ""  # ipv4:127.0.0.1:5000, ipv6:[::1]:5000
    return "address:" + peer.rsplit(":", 1)[0]


class AdapterServicer(adapter_service_pb2_grpc.AdapterServiceServicer):
    def __init__(
        self,
        manager: AdapterManager,
        feed: ChangeFeed,
        metrics: AdapterMetrics,
        max_watchers_per_client: int = 64,
    ) -> None:
        self.manager, self.feed, self.metrics = manager, feed, metrics
        self.max_watchers_per_client = max_watchers_per_client
        self._watching: dict[str, int] = {}  # streams per client

    @contextmanager
    def _registering(self) -> Iterator[list[VersionRow]]:
        """Count what a registration RPC produced or why it was refused."""
        produced: list[VersionRow] = []
        try:
            yield produced
        except InvalidArgument as refused:
            self.metrics.refusals.labels(refused.reason).inc()
            raise
        for row in produced:
            self.metrics.versions.labels(row.kind).inc()
            self.metrics.bytes.inc(row.size_bytes)

    async def CreateAdapter(
        self, request: adapter_service_pb2.CreateAdapterRequest, context: Context
    ) -> adapter_pb2.Adapter:
        adapter = request.adapter
        row = await asyncio.to_thread(
            self.manager.create_adapter,
            request.adapter_id,
            adapter.base_model,
            adapter.description,
            dict(adapter.labels),
            request.request_id,
        )
        return await self._adapter(row)

    async def GetAdapter(
        self, request: adapter_service_pb2.GetAdapterRequest, context: Context
    ) -> adapter_pb2.Adapter:
        return await self._adapter(await asyncio.to_thread(self.manager.get_adapter, request.name))

    async def ListAdapters(
        self, request: adapter_service_pb2.ListAdaptersRequest, context: Context
    ) -> adapter_service_pb2.ListAdaptersResponse:
        page = await asyncio.to_thread(
            self.manager.list_adapters, request.filter, request.page_size, request.page_token
        )
        return adapter_service_pb2.ListAdaptersResponse(
            adapters=[await self._adapter(row) for row in page.items],
            next_page_token=page.next_page_token,
        )

    async def DeleteAdapter(
        self, request: adapter_service_pb2.DeleteAdapterRequest, context: Context
    ) -> empty_pb2.Empty:
        await asyncio.to_thread(self.manager.delete_adapter, request.name)
        return empty_pb2.Empty()

    async def UploadAdapterVersion(
        self,
        request_iterator: AsyncIterator[adapter_service_pb2.UploadAdapterVersionRequest],
        context: Context,
    ) -> adapter_pb2.AdapterVersion:
        requests = aiter(request_iterator)
        first = await anext(requests, None)
        if first is None or not first.HasField("header"):
            raise InvalidArgument("header", "the first message of an upload must carry the header")
        header = first.header
        fingerprint = hashlib.sha256(header.SerializeToString(deterministic=True)).hexdigest()
        worker = UploadWorker("adapter-upload")
        upload: VersionUpload | None = None
        stream = UploadStream(requests, context)
        try:
            async with stream.refusing_early():
                upload = await worker.run(
                    self.manager.begin_upload,
                    header.parent,
                    header.description,
                    lineage_dict(header.lineage),
                    header.request_id,
                    fingerprint,
                )
                existing = await worker.run(self.manager.existing_for, upload)
                if existing is not None:  # a retry: answered without reading it again
                    await stream.drain()
                    return await self._version(existing)
                async for request in stream:
                    if request.HasField("file"):
                        file = request.file
                        await worker.run(upload.start_file, file.path, file.size_bytes, file.sha256)
                    elif request.HasField("chunk"):
                        await worker.run(upload.write, request.chunk)
                    elif request.HasField("header"):
                        raise InvalidArgument("header", "only the first message may carry a header")
            with self._registering() as produced:
                row = await worker.run(self.manager.finish_upload, upload)
                produced.append(row)
        finally:
            await worker.close(upload.discard if upload else None)
        return await self._version(row)

    async def CreateAdapterVersion(
        self, request: adapter_service_pb2.CreateAdapterVersionRequest, context: Context
    ) -> adapter_pb2.AdapterVersion:
        files = [
            {"path": f.path, "uri": f.uri, "sha256": f.sha256, "size_bytes": f.size_bytes}
            for f in request.files
        ]
        with self._registering() as produced:
            row = await asyncio.to_thread(
                self.manager.versions.register,
                request.parent,
                files,
                request.description,
                lineage_dict(request.lineage),
                request.request_id,
            )
            produced.append(row)
        return await self._version(row)

    async def GetAdapterVersion(
        self, request: adapter_service_pb2.GetAdapterVersionRequest, context: Context
    ) -> adapter_pb2.AdapterVersion:
        return await self._version(await asyncio.to_thread(self.manager.get_version, request.name))

    async def ListAdapterVersions(
        self, request: adapter_service_pb2.ListAdapterVersionsRequest, context: Context
    ) -> adapter_service_pb2.ListAdapterVersionsResponse:
        page = await asyncio.to_thread(
            self.manager.list_versions,
            request.parent,
            request.filter,
            request.page_size,
            request.page_token,
        )
        return adapter_service_pb2.ListAdapterVersionsResponse(
            adapter_versions=[await self._version(row) for row in page.items],
            next_page_token=page.next_page_token,
        )

    async def DeleteAdapterVersion(
        self, request: adapter_service_pb2.DeleteAdapterVersionRequest, context: Context
    ) -> empty_pb2.Empty:
        await asyncio.to_thread(self.manager.delete_version, request.name)
        return empty_pb2.Empty()

    async def DownloadAdapterVersion(
        self, request: adapter_service_pb2.DownloadAdapterVersionRequest, context: Context
    ) -> AsyncIterator[adapter_service_pb2.DownloadAdapterVersionResponse]:
        row = await asyncio.to_thread(self.manager.get_version, request.name)
        files = row.files["files"]
        wanted = set(request.paths)
        unknown = wanted - {f["path"] for f in files}
        if unknown:
            raise InvalidArgument("paths", f"the version has no file {sorted(unknown)[0]!r}")
        for file in files:
            if wanted and file["path"] not in wanted:
                continue
            yield adapter_service_pb2.DownloadAdapterVersionResponse(
                file=adapter_pb2.AdapterFile(
                    path=file["path"], size_bytes=file["size_bytes"], sha256=file["sha256"]
                )
            )
            chunks = self.manager.file_chunks(row, file["path"])
            pending = b""
            while True:
                chunk = await asyncio.to_thread(next, chunks, None)
                if chunk is None:
                    break
                pending += chunk
                while len(pending) >= CHUNK:
                    yield adapter_service_pb2.DownloadAdapterVersionResponse(chunk=pending[:CHUNK])
                    pending = pending[CHUNK:]
            if pending:
                yield adapter_service_pb2.DownloadAdapterVersionResponse(chunk=pending)

    async def SetAdapterAlias(
        self, request: adapter_service_pb2.SetAdapterAliasRequest, context: Context
    ) -> adapter_pb2.AdapterAlias:
        expected = request.expected_version if request.HasField("expected_version") else None
        row = await asyncio.to_thread(
            self.manager.aliases.set_alias,
            request.name,
            request.version,
            request.reason,
            current_principal.get().subject,
            expected,
        )
        self.metrics.alias_moves.inc()
        return alias_proto(row)

    async def SetAdapterAliasCanary(
        self, request: adapter_service_pb2.SetAdapterAliasCanaryRequest, context: Context
    ) -> adapter_pb2.AdapterAlias:
        row = await asyncio.to_thread(
            self.manager.aliases.set_canary,
            request.name,
            request.canary.alias,
            request.canary.percent,
            request.reason,
            current_principal.get().subject,
        )
        self.metrics.alias_moves.inc()
        return alias_proto(row)

    async def DeleteAdapterAlias(
        self, request: adapter_service_pb2.DeleteAdapterAliasRequest, context: Context
    ) -> empty_pb2.Empty:
        await asyncio.to_thread(
            self.manager.aliases.delete_alias,
            request.name,
            request.reason,
            current_principal.get().subject,
        )
        self.metrics.alias_moves.inc()
        return empty_pb2.Empty()

    async def ListAdapterAliases(
        self, request: adapter_service_pb2.ListAdapterAliasesRequest, context: Context
    ) -> adapter_service_pb2.ListAdapterAliasesResponse:
        page = await asyncio.to_thread(
            self.manager.aliases.list_aliases, request.parent, request.page_size, request.page_token
        )
        return adapter_service_pb2.ListAdapterAliasesResponse(
            aliases=[alias_proto(row) for row in page.items], next_page_token=page.next_page_token
        )

    async def ListAliasMoves(
        self, request: adapter_service_pb2.ListAliasMovesRequest, context: Context
    ) -> adapter_service_pb2.ListAliasMovesResponse:
        page = await asyncio.to_thread(
            self.manager.aliases.list_moves, request.parent, request.page_size, request.page_token
        )
        return adapter_service_pb2.ListAliasMovesResponse(
            alias_moves=[move_proto(row) for row in page.items],
            next_page_token=page.next_page_token,
        )

    async def WatchAdapterChanges(
        self, request: adapter_service_pb2.WatchAdapterChangesRequest, context: Context
    ) -> AsyncIterator[adapter_pb2.AdapterChange]:
        adapter = request.adapter
        if adapter:
            names.adapter_id(adapter, "adapter")
        if request.after_revision < 0:
            raise InvalidArgument("after_revision", "must not be negative")
        revision = request.after_revision
        if request.start_at_latest:
            revision = await asyncio.to_thread(self.manager.latest_revision)
        client = _client(context)
        if self._watching.get(client, 0) >= self.max_watchers_per_client:
            raise ResourceExhausted(
                f"this client already holds {self.max_watchers_per_client} watch streams",
                reason="TOO_MANY_STREAMS",
                metadata={"limit": str(self.max_watchers_per_client)},
            )
        self._watching[client] = self._watching.get(client, 0) + 1
        try:
            if request.send_bookmarks:
                yield adapter_pb2.AdapterChange(
                    revision=revision, type=adapter_pb2.AdapterChange.TYPE_BOOKMARK
                )
            while True:
                changes = await asyncio.to_thread(self.manager.changes, revision)
                for change in changes:
                    revision = change.revision
                    if adapter and change.payload.get("adapter") != adapter:
                        continue
                    yield change_proto(
                        change.revision, change.kind, change.payload, change.create_time
                    )
                if not changes:
                    await self.feed.wait_past(revision)
        finally:
            self._watching[client] -= 1
            if not self._watching[client]:
                del self._watching[client]

    async def MergeAdapterVersion(
        self, request: adapter_service_pb2.MergeAdapterVersionRequest, context: Context
    ) -> adapter_pb2.AdapterVersion:
        with self._registering() as produced:
            row = await asyncio.to_thread(
                self.manager.versions.merge, request.name, request.dtype, request.request_id
            )
            produced.append(row)
        return await self._version(row)

    async def QuantizeModelVersion(
        self, request: adapter_service_pb2.QuantizeModelVersionRequest, context: Context
    ) -> adapter_pb2.AdapterVersion:
        known = adapter_pb2.ExportFormat.DESCRIPTOR.values_by_number.get(request.format)
        with self._registering() as produced:
            row = await asyncio.to_thread(
                self.manager.versions.quantize,
                request.name,
                known.name if known else str(request.format),  # unknown: INVALID_ARGUMENT
                request.min_top1_agreement,
                request.keep_failed_export,
                request.request_id,
            )
            produced.append(row)
        return await self._version(row)

    async def _adapter(self, row: AdapterRow) -> adapter_pb2.Adapter:
        aliases = await asyncio.to_thread(self.manager.aliases.aliases_of, row.id)
        return adapter_pb2.Adapter(
            name=f"adapters/{row.id}",
            base_model=row.base_model,
            description=row.description,
            labels=row.labels,
            aliases=aliases,
            latest_version=row.latest_version,
            create_time=timestamp(row.create_time),
            update_time=timestamp(row.update_time),
        )

    async def _version(self, row: VersionRow) -> adapter_pb2.AdapterVersion:
        aliases = await asyncio.to_thread(self.manager.aliases.aliases_pointing_at, row)
        version = adapter_pb2.AdapterVersion(
            name=names.version_name(row.adapter_id, row.version),
            version=row.version,
            kind=adapter_pb2.AdapterVersion.Kind.Value(f"KIND_{row.kind.upper()}"),
            description=row.description,
            files=[adapter_pb2.AdapterFile(**f) for f in row.files["files"]],
            size_bytes=row.size_bytes,
            compatibility=[
                json_format.ParseDict(c, adapter_pb2.EngineCompatibility())
                for c in row.compatibility["engines"]
            ],
            smoke_test=json_format.ParseDict(row.smoke_test, adapter_pb2.SmokeTest()),
            lineage=json_format.ParseDict(row.lineage, adapter_pb2.Lineage()),
            serving_name=row.serving_name,
            aliases=[f"adapters/{row.adapter_id}@{a}" for a in sorted(aliases)],
            merged_from=row.merged_from,
            create_time=timestamp(row.create_time),
        )
        if row.config:
            version.config.CopyFrom(
                json_format.ParseDict(row.config, adapter_pb2.AdapterConfigSummary())
            )
        if row.export:
            version.format = adapter_pb2.ExportFormat.Value(row.export["format"])
            version.quantized_from = row.export["quantized_from"]
            json_format.ParseDict(row.export["check"], version.export_check)
        return version


def lineage_dict(lineage: adapter_pb2.Lineage) -> dict[str, Any]:
    document = json_format.MessageToDict(lineage, preserving_proto_field_name=True)
    document.pop("method", None)
    if lineage.method:
        document["method"] = common_pb2.TrainingMethod.Name(lineage.method)
    return document


def alias_proto(row: AliasRow) -> adapter_pb2.AdapterAlias:
    alias = adapter_pb2.AdapterAlias(
        name=f"adapters/{row.adapter_id}/aliases/{row.alias}",
        version=names.version_name(row.adapter_id, row.version),
        update_time=timestamp(row.update_time),
        updated_by=row.updated_by,
    )
    if row.canary_percent and row.canary_alias:
        alias.canary.alias, alias.canary.percent = row.canary_alias, row.canary_percent
    return alias


def move_proto(row: AliasMoveRow) -> adapter_pb2.AliasMove:
    move = adapter_pb2.AliasMove(
        alias=f"adapters/{row.adapter_id}/aliases/{row.alias}",
        from_version=names.version_name(row.adapter_id, row.from_version)
        if row.from_version
        else "",
        to_version=names.version_name(row.adapter_id, row.to_version) if row.to_version else "",
        time=timestamp(row.time),
        actor=row.actor,
        reason=row.reason,
        revision=row.revision,
        canary_changed=row.canary_changed,
    )
    if row.canary_changed and row.canary_percent and row.canary_alias:
        move.canary.alias, move.canary.percent = row.canary_alias, row.canary_percent
    return move


def change_proto(
    revision: int, kind: str, payload: dict[str, Any], time: Any
) -> adapter_pb2.AdapterChange:
    change = adapter_pb2.AdapterChange(
        revision=revision,
        type=adapter_pb2.AdapterChange.Type.Value(kind),
        time=timestamp(time),
        adapter=payload.get("adapter", ""),
        version=payload.get("version", ""),
        alias=payload.get("alias", ""),
        previous_version=payload.get("previous_version", ""),
    )
    if payload.get("canary"):
        change.canary.alias = payload["canary"]["alias"]
        change.canary.percent = payload["canary"]["percent"]
    return change
