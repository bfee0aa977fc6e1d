"""The catalogue of tunefleet's four services and how each is put on a server.

A service whose issue is not done yet is registered from its descriptor with every method
answering UNIMPLEMENTED (reason NOT_IMPLEMENTED) and a message naming the issue, so health,
reflection and clients see the whole API and nothing pretends to work.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor, ServiceDescriptor

from tunefleet.runtime.context import ServiceContext
from tunefleet.runtime.errors import Unimplemented
from tunefleet.runtime.server import ServiceRegistration, TunefleetServer
from tunefleet.v1 import (
    adapter_service_pb2,
    dataset_service_pb2,
    inference_service_pb2,
    training_service_pb2,
)


@dataclass(frozen=True)
class ServiceSpec:
    """A service of the API: its implementation, or the issue that will implement it."""

    key: str  # the name `tunefleet serve <key>` takes
    descriptor: ServiceDescriptor
    issue: int
    build: Callable[[ServiceContext], ServiceRegistration] | None = None


def _datasets(context: ServiceContext) -> ServiceRegistration:
    from tunefleet.datasets.metrics import DatasetMetrics
    from tunefleet.datasets.service import DatasetManager
    from tunefleet.datasets.servicer import DatasetServicer
    from tunefleet.v1 import dataset_service_pb2_grpc

    settings = context.settings
    manager = DatasetManager(
        context.storage.database,
        context.storage.blobs,
        workdir=settings.work_dir / "datasets",
        models=settings.models,
        metrics=DatasetMetrics(context.registry),
    )
    servicer = DatasetServicer(manager)
    return ServiceRegistration(
        "tunefleet.v1.DatasetService",
        lambda server: dataset_service_pb2_grpc.add_DatasetServiceServicer_to_server(
            servicer, server
        ),
    )


def training_service(context: ServiceContext, launcher: Any = None) -> ServiceRegistration:
    """TrainingService with the launcher the settings name (or `launcher`, for tests)."""
    from tunefleet.training.manager import TrainingManager
    from tunefleet.training.metrics import TrainingMetrics
    from tunefleet.training.servicer import TrainingServicer
    from tunefleet.v1 import training_service_pb2_grpc

    settings = context.settings
    if launcher is None and settings.training.launcher == "kubernetes":
        from tunefleet.training.kubernetes import KubernetesLauncher

        launcher = KubernetesLauncher(settings.training.kubernetes)
    elif launcher is None:
        from tunefleet.training.local import LocalLauncher

        launcher = LocalLauncher(settings.data_dir / "training" / "runs")
    manager = TrainingManager(
        context.storage.database,
        context.storage.blobs,
        settings,
        launcher,
        TrainingMetrics(context.registry),
    )
    servicer = TrainingServicer(manager)

    async def start(server: TunefleetServer) -> None:
        host = server.settings.host
        await manager.start(
            f"{'127.0.0.1' if host in ('0.0.0.0', '::', '') else host}:{server.port}"
        )

    return ServiceRegistration(
        "tunefleet.v1.TrainingService",
        lambda server: training_service_pb2_grpc.add_TrainingServiceServicer_to_server(
            servicer, server
        ),
        on_start=start,
        on_stop=manager.stop,
    )


def _adapters(context: ServiceContext) -> ServiceRegistration:
    from tunefleet.adapters import peft_ops
    from tunefleet.adapters.metrics import AdapterMetrics
    from tunefleet.adapters.registry import Hooks, Registry, RegistrySettings
    from tunefleet.adapters.servicer import AdapterServicer
    from tunefleet.runtime.streams import ChangeSignal
    from tunefleet.v1 import adapter_service_pb2_grpc

    settings = context.settings
    signal = ChangeSignal()
    registry = Registry(
        context.storage.database,
        context.storage.blobs,
        workdir=settings.work_dir / "adapters",
        models=settings.models,
        settings=RegistrySettings(
            vllm_max_lora_rank=settings.adapters.vllm_max_lora_rank,
            smoke_test=settings.adapters.smoke_test,
        ),
        hooks=Hooks(smoke_test=peft_ops.smoke_test, merge=peft_ops.merge),
        on_change=signal.notify,
    )
    metrics = AdapterMetrics(context.registry, lambda: signal.watchers)
    servicer = AdapterServicer(registry, signal, metrics)
    return ServiceRegistration(
        "tunefleet.v1.AdapterService",
        lambda server: adapter_service_pb2_grpc.add_AdapterServiceServicer_to_server(
            servicer, server
        ),
    )


SERVICES: dict[str, ServiceSpec] = {
    spec.key: spec
    for spec in (
        ServiceSpec(
            "datasets",
            dataset_service_pb2.DESCRIPTOR.services_by_name["DatasetService"],
            3,
            _datasets,
        ),
        ServiceSpec(
            "training",
            training_service_pb2.DESCRIPTOR.services_by_name["TrainingService"],
            6,
            training_service,
        ),
        ServiceSpec(
            "adapters",
            adapter_service_pb2.DESCRIPTOR.services_by_name["AdapterService"],
            4,
            _adapters,
        ),
        ServiceSpec(
            "inference", inference_service_pb2.DESCRIPTOR.services_by_name["InferenceService"], 7
        ),
    )
}


def registration(key: str, context: ServiceContext) -> ServiceRegistration:
    """How to put service `key` (datasets, training, adapters, inference) on a server."""
    spec = SERVICES[key]
    if spec.build is not None:
        return spec.build(context)
    handler = unimplemented_handler(spec.descriptor, spec.issue)
    return ServiceRegistration(
        spec.descriptor.full_name,
        lambda server: server.add_generic_rpc_handlers((handler,)),
    )


def unimplemented_handler(service: ServiceDescriptor, issue: int) -> grpc.GenericRpcHandler:
    """A handler for every method of `service` that fails with UNIMPLEMENTED."""
    return grpc.method_handlers_generic_handler(
        service.full_name,
        {method.name: _unimplemented_method(method, issue) for method in service.methods},
    )


def _unimplemented_method(method: MethodDescriptor, issue: int) -> grpc.RpcMethodHandler[Any, Any]:
    message = f"{method.full_name} is not implemented yet (tunefleet issue #{issue})"

    async def behavior(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> None:
        raise Unimplemented(message, metadata={"issue": str(issue)})

    request_class = message_factory.GetMessageClass(method.input_type)
    make: Callable[..., grpc.RpcMethodHandler[Any, Any]] = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[(method.client_streaming, method.server_streaming)]
    return make(
        behavior,
        request_deserializer=request_class.FromString,
        response_serializer=lambda response: response.SerializeToString(),
    )
