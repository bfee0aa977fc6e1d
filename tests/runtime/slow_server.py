"""A server with one slow RPC, run as a subprocess by the graceful shutdown tests.

Usage: python -m tests.runtime.slow_server GRACE_SECONDS SLEEP_SECONDS
Prints "PORT <n>" once serving, "SLOW STARTED" and "SLOW FINISHED" around a slow call, and
"ON_STOP" when the service's background work is stopped.
"""

from __future__ import annotations

import asyncio
import dataclasses
import sys
from typing import Any

from tests.helpers import raw_service
from tunefleet.runtime.server import TunefleetServer
from tunefleet.runtime.settings import ServerSettings


async def main(grace: float, sleep: float) -> None:
    async def slow(request: bytes, context: Any) -> bytes:
        print("SLOW STARTED", flush=True)
        await asyncio.sleep(sleep)
        print("SLOW FINISHED", flush=True)
        return b"finished"

    async def on_stop() -> None:
        print("ON_STOP", flush=True)

    async def fast(request: bytes, context: Any) -> bytes:
        return b"fast"

    server = TunefleetServer(
        ServerSettings(port=0, metrics_enabled=False, shutdown_grace_seconds=grace),
        [
            dataclasses.replace(
                raw_service(
                    "test.Slow", {"Slow": ("unary_unary", slow), "Fast": ("unary_unary", fast)}
                ),
                on_stop=on_stop,
            )
        ],
    )
    serving = asyncio.ensure_future(server.serve_until_signal())
    while not server.port:  # noqa: ASYNC110 (the port is known once start() has bound it)
        await asyncio.sleep(0.01)
    print(f"PORT {server.port}", flush=True)
    await serving


if __name__ == "__main__":
    asyncio.run(main(float(sys.argv[1]), float(sys.argv[2])))
