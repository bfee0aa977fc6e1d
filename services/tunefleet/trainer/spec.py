"""The job spec the trainer reads, with the field's defaults and the checks that refuse a spec
before anything big is loaded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tunefleet.runtime.settings import StorageSettings

Method = Literal["lora", "qlora", "dora", "full"]
Objective = Literal["sft", "dpo"]


class SpecError(ValueError):
    """The spec cannot work; the message names each bad field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class DataSpec(_Strict):
    """Records as DatasetService writes them (JSON lines with `messages` and `split`)."""

    # A local path, a file:// URI, or a blob of the spec's store (s3://.../<sha256>).
    uri: str = Field(min_length=1)
    split: Literal["train", "validation", "all"] = "train"

    @property
    def is_blob(self) -> bool:
        return self.uri.startswith(("s3://", "blob:"))

    def path(self) -> Path:
        return Path(self.uri.removeprefix("file://"))


class LoraSpec(_Strict):
    rank: int = Field(default=16, ge=1, le=512)
    alpha: float | None = Field(default=None, gt=0)  # default 2 x rank
    dropout: float = Field(default=0.05, ge=0, lt=1)
    use_rslora: bool = False
    target_modules: Literal["all-linear", "attention"] | list[str] = "all-linear"

    @property
    def scaling_alpha(self) -> float:
        return self.alpha if self.alpha is not None else 2.0 * self.rank


class DpoSpec(_Strict):
    beta: float = Field(default=0.1, gt=0, le=100)  # TRL's default


class Hyperparameters(_Strict):
    learning_rate: float | None = Field(
        default=None, gt=0, le=1
    )  # 2e-4 adapters, 2e-5 full, 5e-6 dpo
    epochs: float = Field(default=3.0, gt=0, le=1000)
    max_steps: int = Field(default=0, ge=0)  # 0: as many as the epochs take
    micro_batch_size: int = Field(default=4, ge=1, le=4096)
    gradient_accumulation_steps: int = Field(default=1, ge=1, le=4096)
    warmup_ratio: float = Field(default=0.05, ge=0, lt=1)
    lr_scheduler: Literal["cosine", "linear", "constant"] = "cosine"
    max_sequence_length: int = Field(default=2048, ge=16, le=1_048_576)
    packing: bool = False
    seed: int = 42
    max_grad_norm: float = Field(default=1.0, ge=0)  # 0 disables clipping
    weight_decay: float = Field(default=0.0, ge=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    eval_every_steps: int = Field(default=0, ge=0)  # 0: at the end of each epoch
    checkpoint_every_steps: int = Field(default=0, ge=0)  # 0: with each evaluation
    early_stopping_patience: int = Field(default=0, ge=0)  # evaluations without improvement
    early_stopping_min_delta: float = Field(default=0.0, ge=0)


class EvaluationSpec(_Strict):
    """Task metrics on held-out examples of the validation data, base model against result:
    EvaluationService's graders that need nothing but the answer and the reference."""

    examples: int = Field(default=0, ge=0, le=10_000)
    metrics: list[Literal["exact_match", "json_valid", "token_f1", "rouge_l"]] = ["exact_match"]
    max_new_tokens: int = Field(default=64, ge=1, le=4096)


class ReportSpec(_Strict):
    """Where progress goes besides the JSON lines file: TrainingService's progress RPC."""

    endpoint: str = ""
    token: str = ""
    job: str = ""  # trainingJobs/{job}
    # A report with no news at least this often, so that the service knows the worker lives
    # through long steps (loading a model, evaluating).
    heartbeat_seconds: float = Field(default=30.0, gt=0)


class RegistrySpec(_Strict):
    """Where the result is registered: an AdapterService and the adapter to add a version to."""

    endpoint: str = ""
    token: str = ""
    adapter: str = ""  # adapters/{adapter}
    # How long to keep retrying while the registry is unavailable before failing the run
    # (REGISTRATION_FAILED; TrainingService can still register the stored output).
    retry_seconds: float = Field(default=600.0, ge=0)


class TrainerSpec(_Strict):
    base_model: str = Field(min_length=1)  # a local directory or a name in `models`
    models: dict[str, Path] = {}  # names the platform knows -> local directories
    method: Method = "lora"
    # sft: cross-entropy on conversations; dpo: preference pairs (tunefleet.trainer.preference)
    objective: Objective = "sft"
    dpo: DpoSpec = DpoSpec()
    lora: LoraSpec = LoraSpec()
    hyperparameters: Hyperparameters = Hyperparameters()
    # Shard parameters, gradients and optimizer state across the run's processes (FSDP2) instead
    # of a whole copy in each (tunefleet.trainer.sharding); one process ignores it.
    fsdp: bool = False
    train_data: DataSpec
    validation_data: DataSpec | None = None
    output_dir: Path
    resume: bool = False  # continue from the newest checkpoint in output_dir/checkpoints
    # Continue from a checkpoint kept in the blob store (the URI a checkpoint report carried).
    resume_from: str = ""
    # Checkpoints kept: the newest this many, and the best (lowest validation loss); older
    # ones are deleted as new ones are written (TrainingService deletes their stored copies).
    keep_checkpoints: int = Field(default=3, ge=1)
    # Where input blobs are read and checkpoints are kept; unset keeps checkpoints local only.
    storage: StorageSettings | None = None
    evaluation: EvaluationSpec = EvaluationSpec()
    report: ReportSpec = ReportSpec()
    registry: RegistrySpec = RegistrySpec()
    job: str = ""  # trainingJobs/{job}, for lineage
    datasets: list[str] = []  # datasets/{dataset}, for lineage
    feedback: list[str] = []  # feedback/{feedback} the data was built from, for lineage

    @model_validator(mode="after")
    def _consistent(self) -> TrainerSpec:
        if self.registry.endpoint and not self.registry.adapter.startswith("adapters/"):
            raise ValueError(
                "registry.adapter must be adapters/{adapter} when an endpoint is given"
            )
        if self.report.endpoint and not self.report.job.startswith("trainingJobs/"):
            raise ValueError("report.job must be trainingJobs/{job} when an endpoint is given")
        if problem := objective_problem(self.objective, self.method, self.hyperparameters):
            raise ValueError(problem)
        return self

    @property
    def learning_rate(self) -> float:
        configured = self.hyperparameters.learning_rate
        if configured is not None:
            return configured
        return default_learning_rate(self.method, self.objective)

    @property
    def checkpoint_dir(self) -> Path:
        return self.output_dir / "checkpoints"

    @property
    def model_dir(self) -> Path:
        path = self.models.get(self.base_model, Path(self.base_model).expanduser())
        return Path(path)


def objective_problem(objective: Objective, method: Method, hp: Hyperparameters) -> str:
    """Why the objective cannot train with this method and these hyperparameters ('' if it can)."""
    if objective == "dpo" and method == "full":
        return (
            "objective: dpo needs an adapter method (lora, qlora or dora): its reference model "
            "is the base with the adapter disabled"
        )
    if objective == "dpo" and hp.packing:
        return "hyperparameters.packing: dpo batches whole pairs and does not pack them"
    return ""


def default_learning_rate(method: Method, objective: Objective = "sft") -> float:
    if objective == "dpo":
        return 5e-6  # as the Zephyr DPO recipes (TRL's own default, 1e-6, is for full models)
    return 2e-5 if method == "full" else 2e-4


def load_spec(path: Path) -> TrainerSpec:
    """Read and check a spec file; SpecError names every bad field.

    A non-empty file `resume_from` beside the spec overrides the spec's `resume_from`: on
    Kubernetes the launcher writes the last checkpoint there while the job runs, so that a
    retried Pod resumes from it (tunefleet.training.manifests)."""
    try:
        document = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SpecError(f"cannot read the spec {str(path)!r}: {exc}") from None
    pointer = path.with_name("resume_from")
    if isinstance(document, dict) and pointer.is_file():
        checkpoint = pointer.read_text().strip()
        if checkpoint:
            document["resume_from"] = checkpoint
    return parse_spec(document)


def parse_spec(document: object) -> TrainerSpec:
    try:
        spec = TrainerSpec.model_validate(document)
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(p) for p in error['loc']) or 'spec'}: {error['msg']}"
            for error in exc.errors()
        ]
        raise SpecError("invalid trainer spec:\n  " + "\n  ".join(problems)) from None
    check_environment(spec)
    return spec


def check_environment(spec: TrainerSpec) -> None:
    """What the spec needs of this machine, checked before anything big is loaded."""
    if not (spec.model_dir / "config.json").is_file():
        raise SpecError(
            f"base_model: {spec.base_model!r} is not a model directory with config.json "
            "(or a name in models)"
        )
    if spec.method == "qlora":
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise SpecError("method: qlora needs bitsandbytes (pip install bitsandbytes)") from None
    for name, data in (("train_data", spec.train_data), ("validation_data", spec.validation_data)):
        if data is None:
            continue
        if data.is_blob and spec.storage is None:
            raise SpecError(f"{name}.uri: {data.uri!r} is a blob, but the spec has no storage")
        if not data.is_blob and not data.path().is_file():
            raise SpecError(f"{name}.uri: {data.uri!r} is not a readable file")
    if spec.resume_from and spec.storage is None:
        raise SpecError("resume_from: a stored checkpoint needs the spec's storage")
