"""Assembles a server process: settings → logging → storage → services → gRPC server, and the
OpenAI-compatible HTTP front beside it.

`tunefleet serve` runs all five services in one process, with the front on its own port (the
embedded shape); `tunefleet serve datasets` runs one (the cluster shape, one Deployment per
service), `tunefleet serve openai` the front alone, calling the services at `openai.target`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence

from tunefleet.app.services import SERVICES, registration
from tunefleet.runtime.context import ServiceContext, open_storage
from tunefleet.runtime.logs import configure_logging
from tunefleet.runtime.metrics import ServerMetrics
from tunefleet.runtime.models import preload_transformers
from tunefleet.runtime.server import Attached, TunefleetServer
from tunefleet.runtime.settings import Settings, SettingsError

FRONT = "openai"


async def serve(
    settings: Settings, service_keys: Sequence[str] = (), exit_with_parent: bool = False
) -> None:
    """Run the named services (all of them, and the front unless `openai.enabled` is off, when
    empty) until SIGTERM or SIGINT (or, with `exit_with_parent`, until the process that started
    this one dies)."""
    configure_logging(settings.logging)
    if service_keys:
        keys, front = [key for key in service_keys if key != FRONT], FRONT in service_keys
    else:
        keys, front = list(SERVICES), settings.openai.enabled
    if front and not keys and not settings.openai.target:
        raise SettingsError(
            "openai.target: must name the services' address (the gateway) when this process "
            "serves only the OpenAI front"
        )
    metrics = ServerMetrics()
    attached: list[Attached] = []
    if front:
        from tunefleet.openai_front.server import OpenAIFront

        base_model = settings.openai.base_model or settings.inference.base_model
        attached.append(OpenAIFront(settings.openai, base_model, metrics.registry))
    with contextlib.ExitStack() as stack:
        registrations = []
        if keys:
            preload_transformers()  # before any worker thread imports from it
            storage = open_storage(settings)
            stack.callback(storage.close)
            context = ServiceContext(settings, storage, metrics.registry, tuple(keys))
            registrations = [registration(key, context) for key in keys]
        server = TunefleetServer(settings.server, registrations, metrics, attached)
        await server.serve_until_signal(os.getppid() if exit_with_parent else None)
