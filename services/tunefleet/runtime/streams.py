"""Streams: client-streamed uploads (their end, and refusals before it), the signal that wakes
server streams following a change feed, and the one poller its watchers share."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager, suppress
from typing import Any, ParamSpec, TypeVar

import grpc

from tunefleet.core.errors import InvalidArgument, TunefleetError, Unavailable

log = logging.getLogger(__name__)

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
            await self.drain()
            raise

    async def drain(self) -> None:
        """Read and discard what the client still sends (for up to DRAIN_SECONDS), so that it
        receives the answer given before the end of its stream rather than a failed write."""
        if not self.ended:
            with suppress(TimeoutError):
                async with asyncio.timeout(DRAIN_SECONDS):
                    await self._drain()

    async def _drain(self) -> None:
        async for _ in self._requests:
            pass
        self.ended = True


P = ParamSpec("P")
T = TypeVar("T")


class UploadWorker:
    """Runs the blocking steps of one upload in order on a thread of its own, so that the
    clean-up after a cancelled stream runs only once the step in progress is done."""

    def __init__(self, name: str) -> None:
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def run(self, function: Callable[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, lambda: function(*args, **kwargs))

    async def close(self, cleanup: Callable[[], object] | None = None) -> None:
        """Run `cleanup` after the step in progress, even if this call is being cancelled."""
        try:
            if cleanup is not None:
                await asyncio.shield(asyncio.wrap_future(self._executor.submit(cleanup)))
        finally:
            self._executor.shutdown(wait=False)


class ChangeSignal:
    """Wakes the streams of this process that follow a change feed (registry changes, a job's
    events) when something changed; `notify` may be called from any thread."""

    def __init__(self) -> None:
        self._waiters: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()

    def notify(self) -> None:
        for loop, event in list(self._waiters):
            loop.call_soon_threadsafe(event.set)

    async def wait(self, seconds: float) -> None:
        event = asyncio.Event()
        waiter = (asyncio.get_running_loop(), event)
        self._waiters.add(waiter)
        try:
            async with asyncio.timeout(seconds):
                await event.wait()
        except TimeoutError:
            pass
        finally:
            self._waiters.discard(waiter)


class ChangeFeed:
    """Where the watchers of one change feed (the registry's) wait: one poller per process
    reads the feed's latest revision every `poll_seconds` while anyone watches (and at once
    when this process changed something), and wakes the watchers whose revision it passed.
    Idle watchers cost nothing, however many there are."""

    def __init__(
        self, latest: Callable[[], int], signal: ChangeSignal, poll_seconds: float
    ) -> None:
        self.latest, self.signal, self.poll_seconds = latest, signal, poll_seconds
        self.revision = 0
        self.watchers = 0
        self.closed = False
        self._wake = asyncio.Event()  # replaced each time the revision moves
        self._poller: asyncio.Task[None] | None = None

    def close(self) -> None:
        """End every wait (the server is draining): watchers answer UNAVAILABLE and resume
        elsewhere after their last revision, instead of holding the shutdown for its grace."""
        self.closed = True
        self._wake.set()

    async def wait_past(self, revision: int) -> None:
        """Return once the feed holds a change after `revision`; UNAVAILABLE once closed."""
        self.watchers += 1
        try:
            if self._poller is None or self._poller.done():
                self._poller = asyncio.create_task(self._poll(), name="change-feed")
            while self.revision <= revision:
                if self.closed:
                    raise Unavailable(
                        "the server is shutting down: watch again after your last revision",
                        reason="SHUTTING_DOWN",
                    )
                await self._wake.wait()
        finally:
            self.watchers -= 1

    async def _poll(self) -> None:
        while self.watchers:
            try:
                latest = await asyncio.to_thread(self.latest)
            except Exception:
                log.warning("reading the change feed's revision failed", exc_info=True)
                latest = self.revision
            if latest != self.revision:
                self.revision = latest
                woken, self._wake = self._wake, asyncio.Event()
                woken.set()
            await self.signal.wait(self.poll_seconds)
