"""Assembles a server process: settings → logging → storage → services → gRPC server.

`tunefleet serve` runs all four services in one process (the embedded shape);
`tunefleet serve datasets` runs one (the cluster shape, one Deployment per service).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

from tunefleet.app.services import SERVICES, registration
from tunefleet.runtime.context import ServiceContext, open_storage
from tunefleet.runtime.logs import configure_logging
from tunefleet.runtime.metrics import ServerMetrics
from tunefleet.runtime.models import preload_transformers
from tunefleet.runtime.server import TunefleetServer
from tunefleet.runtime.settings import Settings


async def serve(
    settings: Settings, service_keys: Sequence[str] = (), exit_with_parent: bool = False
) -> None:
    """Run the named services (all four when empty) until SIGTERM or SIGINT (or, with
    `exit_with_parent`, until the process that started this one dies)."""
    configure_logging(settings.logging)
    keys = list(service_keys) or list(SERVICES)
    preload_transformers()  # before any worker thread imports from it
    storage = open_storage(settings)
    metrics = ServerMetrics()
    context = ServiceContext(settings, storage, metrics.registry, tuple(keys))
    try:
        registrations = [registration(key, context) for key in keys]
        server = TunefleetServer(settings.server, registrations, metrics)
        await server.serve_until_signal(os.getppid() if exit_with_parent else None)
    finally:
        storage.close()
