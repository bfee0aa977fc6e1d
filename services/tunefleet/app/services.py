"""The catalogue of tunefleet's services and how each is put on a server."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from google.protobuf.descriptor import ServiceDescriptor

from tunefleet.runtime.context import ServiceContext
from tunefleet.runtime.models import ModelCatalogue
from tunefleet.runtime.server import ServiceRegistration, TunefleetServer
from tunefleet.runtime.settings import Settings, SettingsError

if TYPE_CHECKING:  # the services' modules load only when their service is put on a server
    from tunefleet.inference.engine import Engine
    from tunefleet.training.launcher import JobLauncher

from tunefleet.v1 import (
    adapter_service_pb2,
    dataset_service_pb2,
    evaluation_service_pb2,
    inference_service_pb2,
    retraining_service_pb2,
    training_service_pb2,
)


@dataclass(frozen=True)
class ServiceSpec:
    """A service of the API and how to build it."""

    key: str  # the name `tunefleet serve <key>` takes
    descriptor: ServiceDescriptor
    build: Callable[[ServiceContext], ServiceRegistration]


def _datasets(context: ServiceContext) -> ServiceRegistration:
    from tunefleet.datasets.manager import DatasetManager
    from tunefleet.datasets.metrics import DatasetMetrics
    from tunefleet.datasets.servicer import DatasetServicer
    from tunefleet.storage.spools import SpaceBudget
    from tunefleet.v1 import dataset_service_pb2_grpc

    settings = context.settings
    manager = DatasetManager(
        context.storage.database_for("datasets"),
        context.storage.blobs,
        workdir=settings.work_dir / "datasets",
        models=ModelCatalogue.of(settings),
        metrics=DatasetMetrics(context.registry),
        space=SpaceBudget(
            settings.work_dir,
            settings.storage.upload_space_factor,
            settings.storage.min_free_bytes,
        ),
    )
    servicer = DatasetServicer(manager)
    return ServiceRegistration(
        "tunefleet.v1.DatasetService",
        lambda server: dataset_service_pb2_grpc.add_DatasetServiceServicer_to_server(
            servicer, server
        ),
    )


def training_service(
    context: ServiceContext, launcher: JobLauncher | None = None
) -> ServiceRegistration:
    """TrainingService with the launcher the settings name (or `launcher`, for tests)."""
    from tunefleet.training.manager import TrainingManager
    from tunefleet.training.metrics import TrainingMetrics
    from tunefleet.training.servicer import TrainingServicer
    from tunefleet.v1 import training_service_pb2_grpc

    settings = context.settings
    remote = set(
        context.services and {"datasets", "adapters", "evaluation"} - set(context.services)
    )
    if not settings.training.registry_endpoint and "adapters" in remote:
        raise SettingsError(
            "training.registry_endpoint: must name an AdapterService (the gateway or the "
            "adapters Service) when this process does not serve adapters; without it trained "
            "results cannot be registered"
        )
    if not settings.training.datasets_endpoint and "datasets" in remote:
        raise SettingsError(
            "training.datasets_endpoint: must name a DatasetService (the gateway or the "
            "datasets Service) when this process does not serve datasets; jobs' datasets are "
            "checked and leased there"
        )
    after = settings.training.evaluation
    if after.enabled and not after.endpoint and "evaluation" in remote:
        raise SettingsError(
            "training.evaluation.endpoint: must name an EvaluationService (the gateway or the "
            "evaluation Service) when this process does not serve evaluations and "
            "training.evaluation.enabled is set"
        )
    if settings.server.auth.enabled and not settings.training.worker_registry_token:
        raise SettingsError(
            "training.worker_registry_token: required when server.auth is enabled: trainers and "
            "this service register results with AdapterService with it (a writer token)"
        )
    if launcher is None and settings.training.launcher == "kubernetes":
        from tunefleet.training.kubernetes import KubernetesLauncher

        launcher = KubernetesLauncher(settings.training.kubernetes)
    elif launcher is None:
        from tunefleet.training.local import LocalLauncher

        launcher = LocalLauncher(settings.data_dir / "training" / "runs")
    manager = TrainingManager(
        context.storage.database_for("training"),
        context.storage.blobs,
        settings,
        launcher,
        TrainingMetrics(context.registry),
    )
    servicer = TrainingServicer(manager)

    async def start(server: TunefleetServer) -> None:
        await manager.start(server.own_address)

    return ServiceRegistration(
        "tunefleet.v1.TrainingService",
        lambda server: training_service_pb2_grpc.add_TrainingServiceServicer_to_server(
            servicer, server
        ),
        on_start=start,
        on_drain=manager.drain,
        on_stop=manager.stop,
    )


def inference_service(
    context: ServiceContext, engines: list[Engine] | None = None
) -> ServiceRegistration:
    """InferenceService with the engines the settings name (or `engines`, for tests); without a
    base model configured every call answers FAILED_PRECONDITION."""
    from tunefleet.inference.adapters import AdapterPool
    from tunefleet.inference.feedback import ResponseLog
    from tunefleet.inference.manager import InferenceManager
    from tunefleet.inference.metrics import InferenceMetrics
    from tunefleet.inference.peers import AdapterServiceClient
    from tunefleet.inference.servicer import InferenceServicer
    from tunefleet.v1 import inference_service_pb2_grpc

    settings, options = context.settings, context.settings.inference
    manager = None
    remote = context.services and "adapters" not in context.services
    if options.base_model and not options.registry_endpoint and remote:
        raise SettingsError(
            "inference.registry_endpoint: must name an AdapterService (the adapters Service) "
            "when this process does not serve adapters; versions and alias moves come from it"
        )
    if settings.server.auth.enabled and options.base_model and not options.registry_token:
        raise SettingsError(
            "inference.registry_token: required when server.auth is enabled: InferenceService "
            "reads versions and follows aliases on AdapterService with it (a reader token)"
        )
    registry = AdapterServiceClient(options.registry_endpoint, options.registry_token)
    if options.base_model:
        # The operator's own setting: any local folder will do.
        model_dir = ModelCatalogue(settings.models).resolve(
            options.base_model, "inference.base_model"
        )
        if engines is None:
            engines = _engines(settings, model_dir)
        metrics = InferenceMetrics(context.registry)
        pool = AdapterPool(
            engines,
            registry,
            options.base_model,
            options.max_loaded_adapters,
            settings.work_dir / "inference",
            metrics,
            ModelCatalogue.of(settings),
        )
        manager = InferenceManager(
            engines,
            pool,
            ResponseLog(context.storage.database_for("inference")),
            metrics,
            options.max_tokens_limit,
            options.max_prompt_tokens,
            options.aliases,
        )
    servicer = InferenceServicer(manager)

    async def start(server: TunefleetServer) -> None:
        registry.endpoint = registry.endpoint or server.own_address
        if manager is not None:
            await manager.start()

    async def stop() -> None:
        if manager is not None:
            await manager.stop()
        await registry.close()

    return ServiceRegistration(
        "tunefleet.v1.InferenceService",
        lambda server: inference_service_pb2_grpc.add_InferenceServiceServicer_to_server(
            servicer, server
        ),
        on_start=start,
        on_stop=stop,
    )


def _engines(settings: Settings, model_dir: Path) -> list[Engine]:
    """The main engine the settings name, and a PEFT engine beside vLLM for what it refuses."""
    from tunefleet.inference.peft_engine import PeftEngine

    options = settings.inference

    def peft() -> Engine:
        return PeftEngine(
            model_dir,
            device=options.device,
            dtype=options.dtype,
            max_batch=options.max_batch,
            prefill_chunk=options.prefill_chunk_tokens,
            prefix_cache_mb=options.prefix_cache_mb,
        )

    if options.engine == "peft":
        return [peft()]
    from tunefleet.inference.vllm_engine import VllmEngine

    engines: list[Engine] = [VllmEngine(model_dir, options.vllm)]
    if options.peft_fallback:
        engines.append(peft())
    return engines


def _adapters(context: ServiceContext) -> ServiceRegistration:
    from tunefleet.adapters import exports, peft_ops
    from tunefleet.adapters.manager import AdapterManager
    from tunefleet.adapters.metrics import AdapterMetrics
    from tunefleet.adapters.servicer import POLL_SECONDS, AdapterServicer
    from tunefleet.adapters.versions import Hooks, RegistrySettings
    from tunefleet.runtime.streams import ChangeFeed, ChangeSignal
    from tunefleet.v1 import adapter_service_pb2_grpc

    settings = context.settings
    signal = ChangeSignal()
    manager = AdapterManager(
        context.storage.database_for("adapters"),
        context.storage.blobs,
        workdir=settings.work_dir / "adapters",
        models=ModelCatalogue.of(settings),
        settings=RegistrySettings(
            vllm_max_lora_rank=settings.adapters.vllm_max_lora_rank,
            smoke_test=settings.adapters.smoke_test,
            export_min_agreement=settings.adapters.export_min_agreement,
        ),
        hooks=Hooks(
            smoke_test=peft_ops.smoke_test,
            merge=peft_ops.merge,
            quantize=exports.write,
            check_export=exports.check,
        ),
        on_change=signal.notify,
    )
    feed = ChangeFeed(manager.latest_revision, signal, POLL_SECONDS)
    metrics = AdapterMetrics(context.registry, lambda: feed.watchers)
    servicer = AdapterServicer(manager, feed, metrics, settings.adapters.max_watchers_per_client)
    return ServiceRegistration(
        "tunefleet.v1.AdapterService",
        lambda server: adapter_service_pb2_grpc.add_AdapterServiceServicer_to_server(
            servicer, server
        ),
        on_drain=feed.close,
    )


def _evaluation(context: ServiceContext) -> ServiceRegistration:
    from tunefleet.evaluation.manager import EvaluationManager
    from tunefleet.evaluation.metrics import EvaluationMetrics
    from tunefleet.evaluation.servicer import EvaluationServicer
    from tunefleet.runtime.experiments import ExperimentMirror
    from tunefleet.v1 import evaluation_service_pb2_grpc

    settings, options = context.settings, context.settings.evaluation
    remote = set(context.services and {"datasets", "inference"} - set(context.services))
    for key, endpoint in (("datasets", "datasets_endpoint"), ("inference", "inference_endpoint")):
        if key in remote and not getattr(options, endpoint):
            raise SettingsError(
                f"evaluation.{endpoint}: must name the {key} Service (or the gateway) when this "
                f"process does not serve {key}"
            )
    if settings.server.auth.enabled and not options.service_token:
        raise SettingsError(
            "evaluation.service_token: required when server.auth is enabled: EvaluationService "
            "reads datasets and asks InferenceService with it (a reader token)"
        )
    manager = EvaluationManager(
        context.storage.database_for("evaluation"),
        options,
        EvaluationMetrics(context.registry),
        ExperimentMirror(settings.mlflow),
    )
    servicer = EvaluationServicer(manager)

    async def start(server: TunefleetServer) -> None:
        await manager.start(server.own_address)

    return ServiceRegistration(
        "tunefleet.v1.EvaluationService",
        lambda server: evaluation_service_pb2_grpc.add_EvaluationServiceServicer_to_server(
            servicer, server
        ),
        on_start=start,
        on_stop=manager.stop,
    )


def _retraining(context: ServiceContext) -> ServiceRegistration:
    from tunefleet.retraining.manager import RetrainingManager
    from tunefleet.retraining.metrics import RetrainingMetrics
    from tunefleet.retraining.servicer import RetrainingServicer
    from tunefleet.v1 import retraining_service_pb2_grpc

    settings, options = context.settings, context.settings.retraining
    others = {"datasets", "training", "adapters", "inference", "evaluation"}
    if context.services and others - set(context.services) and not options.endpoint:
        raise SettingsError(
            "retraining.endpoint: must name the gateway (or a server of every service) when "
            "this process does not serve them all: runs read feedback, upload data, train, "
            "evaluate and move aliases there"
        )
    if settings.server.auth.enabled and not options.service_token:
        raise SettingsError(
            "retraining.service_token: required when server.auth is enabled: RetrainingService "
            "calls the other services with it (a writer token)"
        )
    manager = RetrainingManager(
        context.storage.database_for("retraining"), options, RetrainingMetrics(context.registry)
    )
    servicer = RetrainingServicer(manager)

    async def start(server: TunefleetServer) -> None:
        await manager.start(server.own_address)

    return ServiceRegistration(
        "tunefleet.v1.RetrainingService",
        lambda server: retraining_service_pb2_grpc.add_RetrainingServiceServicer_to_server(
            servicer, server
        ),
        on_start=start,
        on_stop=manager.stop,
    )


SERVICES: dict[str, ServiceSpec] = {
    spec.key: spec
    for spec in (
        ServiceSpec(
            "datasets",
            dataset_service_pb2.DESCRIPTOR.services_by_name["DatasetService"],
            _datasets,
        ),
        ServiceSpec(
            "training",
            training_service_pb2.DESCRIPTOR.services_by_name["TrainingService"],
            training_service,
        ),
        ServiceSpec(
            "adapters",
            adapter_service_pb2.DESCRIPTOR.services_by_name["AdapterService"],
            _adapters,
        ),
        ServiceSpec(
            "inference",
            inference_service_pb2.DESCRIPTOR.services_by_name["InferenceService"],
            inference_service,
        ),
        ServiceSpec(
            "evaluation",
            evaluation_service_pb2.DESCRIPTOR.services_by_name["EvaluationService"],
            _evaluation,
        ),
        ServiceSpec(
            "retraining",
            retraining_service_pb2.DESCRIPTOR.services_by_name["RetrainingService"],
            _retraining,
        ),
    )
}


def registration(key: str, context: ServiceContext) -> ServiceRegistration:
    """How to put service `key` (datasets, training, adapters, inference, evaluation,
    retraining) on a server."""
    return SERVICES[key].build(context)
