"""Helpers shared by the tests: servers on free ports, raw gRPC services, external tools."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any

import grpc
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from tunefleet.demo.server import free_port as free_port  # one copy, in the package
from tunefleet.runtime.server import ServiceRegistration

IN_CI = bool(os.environ.get("CI"))


def require_tool(name: str, hint: str) -> str:
    """Path of an external program a heavy test needs. Missing: the test is skipped on a
    developer machine, and fails in CI (where .ci/run installs it), so CI never skips it."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} not found ({hint})"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


Behavior = Callable[[Any, grpc.aio.ServicerContext[Any, Any]], Any]


def raw_service(name: str, methods: dict[str, tuple[str, Behavior]]) -> ServiceRegistration:
    """A service whose messages are raw bytes. `methods` maps a method name to its kind
    ("unary_unary", "unary_stream", "stream_unary", "stream_stream") and behaviour."""
    makers = {
        "unary_unary": grpc.unary_unary_rpc_method_handler,
        "unary_stream": grpc.unary_stream_rpc_method_handler,
        "stream_unary": grpc.stream_unary_rpc_method_handler,
        "stream_stream": grpc.stream_stream_rpc_method_handler,
    }
    handler = grpc.method_handlers_generic_handler(
        name, {method: makers[kind](behavior) for method, (kind, behavior) in methods.items()}
    )
    return ServiceRegistration(name, lambda server: server.add_generic_rpc_handlers((handler,)))


def error_info(error: grpc.aio.AioRpcError | grpc.RpcError) -> error_details_pb2.ErrorInfo | None:
    """The google.rpc.ErrorInfo detail of a failed call, if it has one."""
    status = rpc_status.from_call(error)
    if status is None:
        return None
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return info
    return None


def field_violations(error: grpc.aio.AioRpcError) -> list[tuple[str, str]]:
    status = rpc_status.from_call(error)
    violations: list[tuple[str, str]] = []
    for detail in status.details if status else []:
        any_detail: any_pb2.Any = detail
        if any_detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            any_detail.Unpack(bad)
            violations += [(v.field, v.description) for v in bad.field_violations]
    return violations


# Typed callables for raw-bytes methods (the messages pass through unchanged).
def unary(channel: grpc.aio.Channel, method: str) -> grpc.aio.UnaryUnaryMultiCallable[bytes, bytes]:
    return channel.unary_unary(method, request_serializer=bytes, response_deserializer=bytes)


def unary_stream(
    channel: grpc.aio.Channel, method: str
) -> grpc.aio.UnaryStreamMultiCallable[bytes, bytes]:
    return channel.unary_stream(method, request_serializer=bytes, response_deserializer=bytes)


def stream_unary(
    channel: grpc.aio.Channel, method: str
) -> grpc.aio.StreamUnaryMultiCallable[bytes, bytes]:
    return channel.stream_unary(method, request_serializer=bytes, response_deserializer=bytes)
