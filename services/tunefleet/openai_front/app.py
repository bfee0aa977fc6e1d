"""The Starlette application: routes, the caller's bearer token forwarded on every gRPC call,
errors in OpenAI's envelope, and request metrics by route and status."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from tunefleet.client import AsyncClient, TunefleetError
from tunefleet.openai_front import alerts, fine_tuning, inference
from tunefleet.openai_front.errors import OpenAIError, translate
from tunefleet.openai_front.models import get_model, list_models

log = logging.getLogger(__name__)

Handler = Callable[[Request, AsyncClient], Awaitable[Response]]


class Front:
    """Routes whose handlers get the SDK client as the request's caller (one connection, each
    call with the caller's token), and answer refusals in OpenAI's envelope."""

    def __init__(self, client: AsyncClient, max_body_bytes: int) -> None:
        self.client, self.max_body_bytes = client, max_body_bytes

    def caller(self, request: Request) -> AsyncClient:
        """The client that calls as the request's caller: `Authorization: Bearer <token>`
        passed on, the services check it and its role; no header or an empty token (what
        lm-eval sends without a key), no token."""
        header = request.headers.get("authorization", "").strip()
        if not header:
            return self.client.with_token(None)
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer":
            raise OpenAIError(
                401,
                "Authorization must be 'Bearer <token>'",
                type="authentication_error",
                code="invalid_api_key",
            )
        return self.client.with_token(token.strip() or None)

    def route(
        self, path: str, handler: Handler, methods: list[str], *, json_body: bool = False
    ) -> Route:
        """A route to `handler`. With `json_body` the body is read first (at most
        `max_body_bytes`) and parsed into `request.state.body`, and a client that disconnects
        before the answer cancels the handler, and with it the gRPC call: a generation stops
        instead of running for no one."""

        async def endpoint(request: Request) -> Response:
            try:
                if not json_body:
                    return await handler(request, self.caller(request))
                request.state.body = await _json(request, self.max_body_bytes)
                return await _unless_gone(request, handler(request, self.caller(request)))
            except OpenAIError as error:
                return error.response()
            except TunefleetError as error:
                return translate(error).response()

        return Route(path, endpoint, methods=methods)


async def _unless_gone(request: Request, answer: Awaitable[Response]) -> Response:
    """`answer`, cancelled if the client disconnects first (the body read, the next message is
    `http.disconnect`, and only when the client goes): then 499, as nginx counts a client that
    closed its request. A streamed response is then on its own: Starlette stops it when the
    client goes."""
    work = asyncio.ensure_future(answer)
    gone = asyncio.ensure_future(request.receive())
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if work.done() or gone.result()["type"] != "http.disconnect":
            return await work
        work.cancel()
        with contextlib.suppress(asyncio.CancelledError, TunefleetError, OpenAIError):
            await work
        log.info("%s %s: the client left; its call was cancelled", request.method, request.url.path)
        return Response(status_code=499)
    finally:
        gone.cancel()


async def _json(request: Request, limit: int) -> Any:
    """The request's JSON body: 413 beyond `limit` bytes (before reading more), 400 if it is not
    JSON."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except ValueError:
        raise OpenAIError(400, "the request body is not valid JSON", code="invalid_json") from None


def _too_large(limit: int) -> OpenAIError:
    return OpenAIError(
        413, f"the request body is larger than {limit} bytes", code="request_too_large"
    )


def build_app(
    client: AsyncClient, base_model: str, registry: CollectorRegistry, max_body_bytes: int
) -> Starlette:
    """The HTTP front over `client` (connected to the services) for the base model
    `base_model`, with its metrics in `registry`; JSON bodies up to `max_body_bytes`."""
    front = Front(client, max_body_bytes)

    async def models(request: Request, caller: AsyncClient) -> Response:
        return JSONResponse({"object": "list", "data": await list_models(caller, base_model)})

    async def model(request: Request, caller: AsyncClient) -> Response:
        return JSONResponse(await get_model(caller, base_model, request.path_params["model"]))

    async def chat(request: Request, caller: AsyncClient) -> Response:
        return await inference.chat_completions(caller, base_model, request.state.body)

    async def completions(request: Request, caller: AsyncClient) -> Response:
        return await inference.completions(caller, base_model, request.state.body)

    async def create_job(request: Request, caller: AsyncClient) -> Response:
        return await fine_tuning.create_job(request, caller, request.state.body)

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    routes = [
        front.route("/v1/models", models, ["GET"]),
        front.route("/v1/models/{model:path}", model, ["GET"]),
        front.route("/v1/chat/completions", chat, ["POST"], json_body=True),
        front.route("/v1/completions", completions, ["POST"], json_body=True),
        front.route("/v1/files", fine_tuning.create_file, ["POST"]),
        front.route("/v1/files", fine_tuning.list_files, ["GET"]),
        front.route("/v1/files/{file_id}", fine_tuning.get_file, ["GET"]),
        front.route("/v1/files/{file_id}", fine_tuning.delete_file, ["DELETE"]),
        front.route("/v1/files/{file_id}/content", fine_tuning.file_content, ["GET"]),
        front.route("/v1/fine_tuning/jobs", create_job, ["POST"], json_body=True),
        front.route("/v1/fine_tuning/jobs", fine_tuning.list_jobs, ["GET"]),
        front.route("/v1/fine_tuning/jobs/{job_id}", fine_tuning.get_job, ["GET"]),
        front.route("/v1/fine_tuning/jobs/{job_id}/cancel", fine_tuning.cancel_job, ["POST"]),
        front.route("/v1/fine_tuning/jobs/{job_id}/events", fine_tuning.job_events, ["GET"]),
        front.route(
            "/v1/fine_tuning/jobs/{job_id}/checkpoints", fine_tuning.job_checkpoints, ["GET"]
        ),
        front.route("/v1/fine_tuning/jobs/{job_id}/pause", fine_tuning.unsupported, ["POST"]),
        front.route("/v1/fine_tuning/jobs/{job_id}/resume", fine_tuning.unsupported, ["POST"]),
        front.route("/v1/alertmanager/webhook", alerts.webhook, ["POST"], json_body=True),
        Route("/health", health, methods=["GET"]),
    ]

    async def http_error(request: Request, error: Exception) -> Response:
        assert isinstance(error, HTTPException)
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {error.detail}"
        return OpenAIError(error.status_code, message, type=kind, code=None).response()

    async def server_error(request: Request, error: Exception) -> Response:
        log.exception("%s %s failed", request.method, request.url.path)
        return OpenAIError(
            500, "internal error (logged by the server)", type="server_error"
        ).response()

    app = Starlette(
        routes=routes,
        exception_handlers={HTTPException: http_error, Exception: server_error},
    )
    app.add_middleware(RequestMetrics, registry=registry, routes=routes)
    return app


class RequestMetrics:
    """`tunefleet_openai_requests_total{route, method, status}` and
    `tunefleet_openai_request_seconds{route, method}` (until the last byte of the response, a
    stream's included), with the route's template as the label, never the raw path."""

    def __init__(self, app: ASGIApp, registry: CollectorRegistry, routes: list[Route]) -> None:
        self.app, self.routes = app, routes
        self.requests = Counter(
            "tunefleet_openai_requests",
            "HTTP requests to the OpenAI-compatible front, by route template, method and status.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.seconds = Histogram(
            "tunefleet_openai_request_seconds",
            "Time from an HTTP request to the last byte of its response, streams included.",
            ["route", "method"],
            registry=registry,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        route = next(
            (r.path for r in self.routes if r.matches(scope)[0] == Match.FULL), "unmatched"
        )
        method, status, started = scope["method"], 500, time.perf_counter()

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.requests.labels(route, method, str(status)).inc()
            self.seconds.labels(route, method).observe(time.perf_counter() - started)
