"""InferenceService's client of AdapterService: what it serves comes through AdapterService's
public RPCs, never its tables. Versions are resolved with GetAdapterVersion, weights fetched
with DownloadAdapterVersion (each file checked against its sha256), and alias moves followed on
WatchAdapterChanges, a pushed stream that resumes after the last revision it delivered when
AdapterService restarts or the connection drops, so no move is lost."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import grpc

from tunefleet.core.errors import DataLoss, relayed
from tunefleet.runtime.peers import Peer
from tunefleet.v1 import adapter_pb2, adapter_service_pb2, adapter_service_pb2_grpc

log = logging.getLogger(__name__)

DOWNLOAD_SECONDS = 600.0
# Reconnecting the watch: first after this, doubling up to the most.
RETRY_SECONDS, MAX_RETRY_SECONDS = 0.2, 5.0


@dataclass(frozen=True)
class Version:
    """What serving needs to know of an adapter version."""

    name: str  # adapters/{adapter}/versions/{n}
    serving_name: str  # unique to these bytes, never reused
    full_model: bool  # a merged (or quantized) model, not an adapter
    base_model: str
    files: tuple[adapter_pb2.AdapterFile, ...]


class AdapterServiceClient(Peer):
    """AdapterService, seen from InferenceService."""

    service = "AdapterService"

    stub_class = adapter_service_pb2_grpc.AdapterServiceStub

    def __init__(self, endpoint: str = "", token: str = "") -> None:
        super().__init__(endpoint, token)
        # A version (serving name and creation time: an adapter deleted and created again, for
        # another base model perhaps, has versions created anew) -> its adapter's base model.
        self._base_models: dict[tuple[str, int], str] = {}

    async def version(self, reference: str) -> Version:
        """The version a name or `adapters/{adapter}@{alias}` points at now; AdapterService's
        own error (NOT_FOUND, ...) otherwise."""
        request = adapter_service_pb2.GetAdapterVersionRequest(name=reference)
        found = await self.call("GetAdapterVersion", request)
        key = (found.serving_name, found.create_time.ToNanoseconds())
        base_model = self._base_models.get(key)
        if base_model is None:
            adapter = found.name.split("/versions/")[0]
            parent = await self.call(
                "GetAdapter", adapter_service_pb2.GetAdapterRequest(name=adapter)
            )
            base_model = self._base_models[key] = parent.base_model
        return Version(
            name=found.name,
            serving_name=found.serving_name,
            full_model=found.kind != adapter_pb2.AdapterVersion.KIND_ADAPTER,
            base_model=base_model,
            files=tuple(found.files),
        )

    async def canary(self, alias: str) -> adapter_pb2.AliasCanary | None:
        """The canary of `adapters/{adapter}@{alias}`, if it has one."""
        adapter, _, name = alias.partition("@")
        token = ""
        while True:
            request = adapter_service_pb2.ListAdapterAliasesRequest(
                parent=adapter, page_size=1000, page_token=token
            )
            page = await self.call("ListAdapterAliases", request)
            for found in page.aliases:
                if found.name == f"{adapter}/aliases/{name}":
                    return found.canary if found.HasField("canary") else None
            token = page.next_page_token
            if not token:
                return None

    async def download(self, version: Version, paths: Iterable[str], directory: Path) -> None:
        """Write the version's files `paths` into `directory` (written off the event loop), each
        checked against its sha256 (DATA_LOSS if one differs or is missing)."""
        wanted = {file.path: file for file in version.files if file.path in set(paths)}
        request = adapter_service_pb2.DownloadAdapterVersionRequest(
            name=version.name, paths=sorted(wanted)
        )
        stream = self.stub.DownloadAdapterVersion(
            request, timeout=DOWNLOAD_SECONDS, metadata=self.metadata
        )
        arrived: list[str] = []
        current: adapter_pb2.AdapterFile | None = None
        digest = hashlib.sha256()
        out: BinaryIO | None = None
        try:
            async for message in stream:
                if message.HasField("file"):
                    _check(current, digest, version)
                    if message.file.path not in wanted:
                        raise DataLoss(f"{version.name}: {message.file.path!r} came unasked")
                    current, digest = message.file, hashlib.sha256()
                    arrived.append(current.path)
                    if out is not None:
                        await asyncio.to_thread(out.close)
                    out = await asyncio.to_thread((directory / current.path).open, "wb")
                elif out is not None:
                    digest.update(message.chunk)
                    await asyncio.to_thread(out.write, message.chunk)
            _check(current, digest, version)
        except grpc.aio.AioRpcError as error:
            raise relayed(error, self.service) from None
        finally:
            if out is not None:
                await asyncio.to_thread(out.close)
        missing = set(wanted) - set(arrived)
        if missing:
            raise DataLoss(f"{version.name}: {sorted(missing)} did not arrive")

    async def changes(
        self, after: int, on_connect: Callable[[int], Awaitable[None]] | None = None
    ) -> AsyncIterator[adapter_pb2.AdapterChange]:
        """Every change after revision `after`, as AdapterService pushes them, for ever: a broken
        stream is opened again after the last revision delivered. `after` -1 starts at the
        newest change. `on_connect(revision)` runs each time the stream is open, with the
        revision it resumes after."""
        delay = RETRY_SECONDS
        while True:
            request = adapter_service_pb2.WatchAdapterChangesRequest(
                after_revision=max(after, 0), start_at_latest=after < 0, send_bookmarks=True
            )
            stream = self.stub.WatchAdapterChanges(request, metadata=self.metadata)
            try:
                async for change in stream:
                    delay = RETRY_SECONDS
                    if change.type == adapter_pb2.AdapterChange.TYPE_BOOKMARK:
                        after = change.revision
                        if on_connect is not None:
                            await on_connect(after)
                        continue
                    after = change.revision
                    yield change
            except grpc.aio.AioRpcError as error:
                log.warning(
                    "the watch on AdapterService (%s) broke: %s; again in %.1f s",
                    self.endpoint,
                    error.code().name,
                    delay,
                )
            finally:
                stream.cancel()
            await asyncio.sleep(delay)
            delay = min(delay * 2, MAX_RETRY_SECONDS)


def _check(file: adapter_pb2.AdapterFile | None, digest: hashlib._Hash, version: Version) -> None:
    if file is not None and digest.hexdigest() != file.sha256:
        raise DataLoss(
            f"{version.name}: {file.path} arrived with sha256 {digest.hexdigest()}, "
            f"not {file.sha256}",
            reason="ADAPTER_FILE_CORRUPT",
        )
