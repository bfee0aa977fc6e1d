"""Checking a requested TrainingJob and turning it into the trainer's spec.

The hyperparameter and adapter checks are the trainer's own (its pydantic spec), so a job the
service accepts is one the trainer accepts; errors name the request field, for example
`training_job.hyperparameters.micro_batch_size`.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from tunefleet.core.errors import FailedPrecondition, InvalidArgument
from tunefleet.runtime.models import ModelCatalogue
from tunefleet.runtime.settings import TrainingSettings
from tunefleet.trainer.spec import (
    DpoSpec,
    Hyperparameters,
    LoraSpec,
    Method,
    Objective,
    default_learning_rate,
    objective_problem,
)
from tunefleet.training.estimate import Estimate, GiB, estimate, model_shape
from tunefleet.v1 import common_pb2, training_job_pb2

log = logging.getLogger(__name__)

METHODS: dict[int, Method] = {
    common_pb2.TRAINING_METHOD_LORA: "lora",
    common_pb2.TRAINING_METHOD_QLORA: "qlora",
    common_pb2.TRAINING_METHOD_DORA: "dora",
    common_pb2.TRAINING_METHOD_FULL: "full",
}
H = training_job_pb2.Hyperparameters
SCHEDULERS = {
    H.LR_SCHEDULER_UNSPECIFIED: "cosine",
    H.LR_SCHEDULER_COSINE: "cosine",
    H.LR_SCHEDULER_LINEAR: "linear",
    H.LR_SCHEDULER_CONSTANT: "constant",
}
PRECISIONS = {
    H.PRECISION_UNSPECIFIED: "auto",
    H.PRECISION_FP32: "fp32",
    H.PRECISION_BF16: "bf16",
    H.PRECISION_FP16: "fp16",
}
OBJECTIVES: dict[int, Objective] = {
    training_job_pb2.TRAINING_OBJECTIVE_UNSPECIFIED: "sft",
    training_job_pb2.TRAINING_OBJECTIVE_SFT: "sft",
    training_job_pb2.TRAINING_OBJECTIVE_DPO: "dpo",
}
PRESETS = {
    training_job_pb2.LoraConfig.TARGET_PRESET_UNSPECIFIED: "all-linear",
    training_job_pb2.LoraConfig.TARGET_PRESET_ALL_LINEAR: "all-linear",
    training_job_pb2.LoraConfig.TARGET_PRESET_ATTENTION: "attention",
}
FIELD = "training_job"
MAX_FEEDBACK = 10_000
FEEDBACK_NAME = re.compile(r"feedback/[A-Za-z0-9_-]{1,64}")
M = TypeVar("M", bound=BaseModel)


@dataclass(frozen=True)
class Checked:
    """A job that passed every check: the method, its trainer settings and the estimate."""

    method: Method
    objective: Objective
    dpo: DpoSpec
    lora: LoraSpec
    hyperparameters: Hyperparameters
    estimate: Estimate


def check(
    job: training_job_pb2.TrainingJob,
    models: ModelCatalogue,
    settings: TrainingSettings,
) -> Checked:
    """Every check of a job that needs no storage: base model, method, adapter shape,
    hyperparameters, resources and the GPU memory fit."""
    if not job.base_model:
        raise InvalidArgument(f"{FIELD}.base_model", "is required")
    if len(job.feedback) > MAX_FEEDBACK:
        raise InvalidArgument(f"{FIELD}.feedback", f"at most {MAX_FEEDBACK} names")
    for index, name in enumerate(job.feedback):
        if not FEEDBACK_NAME.fullmatch(name):
            raise InvalidArgument(f"{FIELD}.feedback[{index}]", "must be feedback/{feedback}")
    model_dir = models.resolve(job.base_model, f"{FIELD}.base_model")
    method = METHODS.get(job.method)
    if method is None:
        raise InvalidArgument(f"{FIELD}.method", "is required (LORA, QLORA, DORA or FULL)")
    objective = OBJECTIVES.get(job.objective)
    if objective is None:
        raise InvalidArgument(f"{FIELD}.objective", f"unknown objective {job.objective}")
    dpo = _validated(DpoSpec, {"beta": job.dpo.beta} if job.dpo.HasField("beta") else {}, "dpo")
    lora = _validated(LoraSpec, _lora(job.lora), "lora")
    hyperparameters = _validated(
        Hyperparameters, _hyperparameters(job.hyperparameters), "hyperparameters"
    )
    if problem := objective_problem(objective, method, hyperparameters):
        where, why = problem.split(": ", 1)
        raise InvalidArgument(f"{FIELD}.{where}", why)
    resources = job.resources
    if resources.gpu_count < 0 or resources.gpu_count > settings.max_gpus_per_job:
        raise InvalidArgument(
            f"{FIELD}.resources.gpu_count", f"must be 0 to {settings.max_gpus_per_job}"
        )
    if settings.launcher == "local" and resources.gpu_count > settings.local_gpus:
        raise FailedPrecondition(
            f"{FIELD}.resources.gpu_count: the local launcher has {settings.local_gpus} GPUs, "
            f"the job asks for {resources.gpu_count}",
            reason="NOT_ENOUGH_GPUS",
        )
    if resources.node_count < 0 or resources.node_count > settings.max_nodes_per_job:
        raise InvalidArgument(
            f"{FIELD}.resources.node_count", f"must be 0 to {settings.max_nodes_per_job}"
        )
    if settings.launcher == "local" and resources.node_count > 1:
        raise FailedPrecondition(
            f"{FIELD}.resources.node_count: the local launcher runs on this machine alone; "
            "jobs of more than one node need the Kubernetes launcher",
            reason="ONE_NODE_ONLY",
        )
    gpus = resources.gpu_count * max(resources.node_count, 1)
    if resources.fsdp and gpus < 2:
        raise InvalidArgument(
            f"{FIELD}.resources.fsdp",
            f"shards the model across the run's GPUs: it needs at least 2 (gpu_count x "
            f"node_count is {gpus})",
        )
    if settings.launcher == "kubernetes" and resources.gpu_count == 0:
        raise InvalidArgument(
            f"{FIELD}.resources.gpu_count", "Kubernetes jobs need at least one GPU"
        )
    for name in ("cpu_cores", "memory_bytes", "gpu_memory_bytes"):
        if getattr(resources, name) < 0:
            raise InvalidArgument(f"{FIELD}.resources.{name}", "must not be negative")
    if resources.max_run_duration.seconds < 0:
        raise InvalidArgument(f"{FIELD}.resources.max_run_duration", "must not be negative")
    known_type = resources.gpu_type in settings.gpu_types or resources.gpu_memory_bytes
    if resources.gpu_type and not known_type:
        known = ", ".join(sorted(settings.gpu_types))
        raise InvalidArgument(
            f"{FIELD}.resources.gpu_type",
            f"{resources.gpu_type!r} is not a known GPU type ({known}); "
            "give gpu_memory_bytes with it",
        )
    try:
        shape = model_shape(model_dir)
    except (OSError, ValueError) as error:
        # transformers' words name server paths: the log has them, the caller does not.
        log.warning("cannot read the config of %s: %s", job.base_model, error)
        raise InvalidArgument(
            f"{FIELD}.base_model", "its config.json cannot be read as a transformers model"
        ) from None
    found = estimate(
        shape,
        method,
        hyperparameters.precision,
        lora.rank,
        lora.target_modules,
        # DPO reads a pair's two answers in one batch: twice the rows.
        hyperparameters.micro_batch_size * (2 if objective == "dpo" else 1),
        hyperparameters.max_sequence_length,
        shards=gpus if resources.fsdp else 1,
    )
    available = (
        resources.gpu_memory_bytes
        or settings.gpu_types.get(resources.gpu_type, 0)
        or settings.gpu_memory_bytes
    )
    if resources.gpu_count and found.gpu_memory_bytes > available:
        raise FailedPrecondition(
            f"{FIELD}.resources: the job needs about {found.gpu_memory_bytes / GiB:.1f} GiB per "
            f"GPU but its GPUs have {available / GiB:.1f} GiB ({found.explanation}); "
            + ("use QLoRA, " if method != "qlora" else "")
            + ("shard the model across more GPUs (fsdp), " if gpus > 1 else "")
            + "use a smaller micro_batch_size or max_sequence_length, or larger GPUs",
            reason="INSUFFICIENT_GPU_MEMORY",
            metadata={
                "estimated_bytes": str(found.gpu_memory_bytes),
                "available_bytes": str(available),
            },
        )
    return Checked(method, objective, dpo, lora, hyperparameters, found)


def resolved_hyperparameters(checked: Checked) -> training_job_pb2.Hyperparameters:
    """The hyperparameters the trainer will use, defaults filled in, to report back."""
    hp = checked.hyperparameters
    # The trainer's fields have the proto's names; only the enums and the default learning
    # rate need translating.
    return training_job_pb2.Hyperparameters(
        **{
            **hp.model_dump(),
            "learning_rate": hp.learning_rate
            or default_learning_rate(checked.method, checked.objective),
            "lr_scheduler": {v: k for k, v in SCHEDULERS.items() if k}[hp.lr_scheduler],
            "precision": {v: k for k, v in PRECISIONS.items()}[hp.precision],
        }
    )


def _lora(config: training_job_pb2.LoraConfig) -> dict[str, Any]:
    document: dict[str, Any] = {
        "rank": config.rank or 16,
        "use_rslora": config.use_rslora,
        "target_modules": list(config.target_modules) or PRESETS[config.target_preset],
    }
    if config.HasField("alpha"):
        document["alpha"] = config.alpha
    if config.HasField("dropout"):
        document["dropout"] = config.dropout
    return document


def _hyperparameters(hp: training_job_pb2.Hyperparameters) -> dict[str, Any]:
    document: dict[str, Any] = {
        "max_steps": hp.max_steps,
        "micro_batch_size": hp.micro_batch_size or 4,
        "gradient_accumulation_steps": hp.gradient_accumulation_steps or 1,
        "lr_scheduler": SCHEDULERS.get(hp.lr_scheduler, "cosine"),
        "max_sequence_length": hp.max_sequence_length or 2048,
        "packing": hp.packing,
        "weight_decay": hp.weight_decay,
        "precision": PRECISIONS.get(hp.precision, "auto"),
        "eval_every_steps": hp.eval_every_steps,
        "checkpoint_every_steps": hp.checkpoint_every_steps,
        "early_stopping_patience": hp.early_stopping_patience,
        "early_stopping_min_delta": hp.early_stopping_min_delta,
    }
    for name in ("learning_rate", "epochs", "warmup_ratio", "seed", "max_grad_norm"):
        if hp.HasField(name):
            document[name] = getattr(hp, name)
    return document


def _validated(model: type[M], document: dict[str, Any], section: str) -> M:
    try:
        return model.model_validate(document)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        raise InvalidArgument(f"{FIELD}.{section}.{where}", error["msg"]) from None
