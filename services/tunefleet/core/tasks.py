"""Background asyncio tasks."""

from __future__ import annotations

import asyncio
from typing import Any


async def cancel(task: asyncio.Task[Any]) -> None:
    """Cancel `task` and wait until it has ended, cancelling again if a cancellation was lost
    (on Python 3.11, `asyncio.wait_for` inside a task can swallow one)."""
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=1.0)
