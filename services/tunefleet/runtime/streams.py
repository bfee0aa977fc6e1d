"""Helpers for client-streaming RPCs."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from tunefleet.runtime.errors import TunefleetError


@asynccontextmanager
async def refusing_early(requests: AsyncIterator[Any]) -> AsyncIterator[None]:
    """When a stream is refused before the client has sent all of it, read and discard the rest
    before answering. A grpc-python client still writing when the server answers reports a
    failed write (INTERNAL "Internal error from Core") instead of the server's status; draining
    lets it see the real error. The per-stream upload limit still bounds what is read."""
    try:
        yield
    except TunefleetError:
        async for _ in requests:
            pass
        raise
