"""Client-streamed uploads: the end of the stream, and refusals before it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import grpc

from tunefleet.runtime.errors import InvalidArgument, TunefleetError

DRAIN_SECONDS = 30.0


class UploadStream:
    """The messages of an upload, which must end with `finish_write` on the last one.

    When a client cancels or its connection drops, grpc.aio can simply end the request
    iterator, which looks exactly like a finished upload (seen here); so uploads carry an explicit
    `finish_write`, and a stream that ends without it is refused and stores nothing.
    """

    def __init__(self, requests: AsyncIterator[Any], context: grpc.aio.ServicerContext[Any, Any]):
        self._requests = requests
        self._context = context
        self.ended = False

    async def __aiter__(self) -> AsyncIterator[Any]:
        finished = False
        async for request in self._requests:
            if finished:
                raise InvalidArgument("finish_write", "no message may follow finish_write")
            finished = request.finish_write
            yield request
        self.ended = True
        if self._context.cancelled():
            raise asyncio.CancelledError("the client cancelled the stream")
        if not finished:
            raise InvalidArgument(
                "finish_write",
                "the stream ended without finish_write on its last message; nothing was stored",
                reason="UPLOAD_INCOMPLETE",
            )

    @asynccontextmanager
    async def refusing_early(self) -> AsyncIterator[None]:
        """When the upload is refused while the client is still sending, read and discard the
        rest (for up to DRAIN_SECONDS) before answering: a grpc-python client that is still
        writing reports a failed write (INTERNAL "Internal error from Core") instead of the
        server's status. The per-stream upload limit bounds what is read."""
        try:
            yield
        except TunefleetError:
            if not self.ended:
                with suppress(TimeoutError):
                    await asyncio.wait_for(self._drain(), DRAIN_SECONDS)
            raise

    async def _drain(self) -> None:
        async for _ in self._requests:
            pass
        self.ended = True
