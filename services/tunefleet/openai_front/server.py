"""The front's HTTP server: uvicorn on the process's event loop, started after the gRPC server
(whose address it calls unless `openai.target` names the services elsewhere) and stopped
before it, so that no request in flight loses the services it calls."""

from __future__ import annotations

import asyncio
import logging

import uvicorn
from prometheus_client import CollectorRegistry

from tunefleet.client import TLS, AsyncClient, Options
from tunefleet.openai_front.app import build_app
from tunefleet.runtime.server import TunefleetServer
from tunefleet.runtime.settings import OpenAISettings, SettingsError

log = logging.getLogger(__name__)


class OpenAIFront:
    """Attached to a TunefleetServer: started once its services serve, stopped before they
    stop."""

    def __init__(
        self, settings: OpenAISettings, base_model: str, registry: CollectorRegistry
    ) -> None:
        self.settings, self.base_model, self.registry = settings, base_model, registry
        self.port = 0
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self._client: AsyncClient | None = None

    async def start(self, server: TunefleetServer) -> None:
        settings = self.settings
        tls: bool | TLS = (
            TLS(settings.target_ca_file) if settings.target_ca_file else settings.target_tls
        )
        self._client = AsyncClient(
            settings.target or server.own_address,
            tls=tls,
            options=Options(timeout=settings.request_timeout_seconds),
        )
        app = build_app(
            self._client, self.base_model, self.registry, server.settings.max_message_bytes
        )
        config = uvicorn.Config(
            app,
            host=settings.host,
            port=settings.port,
            lifespan="off",
            log_config=None,
            access_log=False,
            timeout_graceful_shutdown=int(server.settings.shutdown_grace_seconds),
        )
        config.load()
        self._server = uvicorn.Server(config)
        # Server.serve() would take over SIGTERM and SIGINT, which are the process's: its steps
        # are run here instead (what serve() does between its signal handling).
        self._server.lifespan = config.lifespan_class(config)
        # uvicorn binds the port itself: its sockets, unlike socket.create_server's, are made
        # with IPPROTO_TCP, which asyncio needs to set TCP_NODELAY on each connection (without it
        # every keep-alive response waited 40 ms for a delayed ACK).
        try:
            await self._server.startup()
        except SystemExit:  # uvicorn's answer to a port it cannot bind (it logged why)
            raise SettingsError(
                f"openai.port: cannot listen on {settings.host}:{settings.port}"
            ) from None
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        self._task = asyncio.create_task(self._server.main_loop())
        log.info("OpenAI-compatible API on http://%s:%d/v1", settings.host, self.port)

    async def stop(self) -> None:
        """Stop accepting, let requests in flight finish (the server's grace), close."""
        if self._server is None:
            return
        self._server.should_exit = True
        if self._task is not None:
            await self._task
        await self._server.shutdown()
        self._server = None
        if self._client is not None:
            await self._client.close()
