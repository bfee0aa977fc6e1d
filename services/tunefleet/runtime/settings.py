"""Typed settings, read once at start-up.

Sources, highest priority first: keyword arguments, environment variables with the `TUNEFLEET_`
prefix (nested sections joined by `__`, for example `TUNEFLEET_SERVER__PORT=50052`), an optional
YAML file, then the defaults below. A bad value fails start-up with a `SettingsError` naming the
setting, for example `server.port (TUNEFLEET_SERVER__PORT): Input should be less than 65536`.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from tunefleet.core.graders import BY_NAME as GRADER_NAMES

ENV_PREFIX = "TUNEFLEET_"
ENV_NESTED_DELIMITER = "__"

MiB = 1024 * 1024
GiB = 1024 * MiB


VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def _lora_rank(value: int) -> int:
    if value not in VLLM_LORA_RANKS:
        raise ValueError(f"must be one of {', '.join(map(str, VLLM_LORA_RANKS))}")
    return value


# An int checked against vLLM's ranks (a Literal of ints refuses every value from the
# environment, which arrive as strings).
LoraRank = Annotated[int, AfterValidator(_lora_rank)]


class SettingsError(ValueError):
    """Settings could not be loaded; the message names each bad setting and why."""


class _Section(BaseModel):
    """A settings section; unknown keys are errors, so typos fail start-up."""

    model_config = ConfigDict(extra="forbid")


class TlsSettings(_Section):
    """TLS for the gRPC port. Off when `cert_file` is unset."""

    cert_file: Path | None = None
    key_file: Path | None = None
    # Set to require and verify client certificates (mutual TLS).
    client_ca_file: Path | None = None

    @model_validator(mode="after")
    def _pair(self) -> TlsSettings:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("cert_file and key_file must be set together")
        if self.client_ca_file is not None and self.cert_file is None:
            raise ValueError("client_ca_file (mutual TLS) needs cert_file and key_file")
        for name in ("cert_file", "key_file", "client_ca_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name} {str(path)!r} is not a readable file")
        return self

    @property
    def enabled(self) -> bool:
        return self.cert_file is not None


class AuthSettings(_Section):
    """Bearer-token authentication. Off by default (the embedded shape, on the loopback); a server
    on an address other machines reach needs it on, or `disabled` to say it runs open on purpose."""

    enabled: bool = False
    # YAML file listing tokens by their sha256; see tunefleet.runtime.auth.
    tokens_file: Path | None = None
    # Serve without tokens on a non-loopback address (behind a proxy that authenticates).
    disabled: bool = False

    @model_validator(mode="after")
    def _tokens(self) -> AuthSettings:
        if self.enabled and self.tokens_file is None:
            raise ValueError("tokens_file is required when enabled is true")
        if self.enabled and self.disabled:
            raise ValueError("enabled and disabled cannot both be true")
        return self


class ServerSettings(_Section):
    """The gRPC server and its limits."""

    host: str = "127.0.0.1"
    # 0 picks a free port (tests).
    port: int = Field(default=50051, ge=0, le=65535)
    # Prometheus /metrics over HTTP.
    metrics_enabled: bool = True
    metrics_host: str = "127.0.0.1"
    metrics_port: int = Field(default=9090, ge=0, le=65535)
    # Largest single gRPC message in either direction.
    max_message_bytes: int = Field(default=16 * MiB, ge=1024)
    # Largest total of one client stream (uploads).
    max_upload_bytes: int = Field(default=64 * 1024 * MiB, ge=1024)
    # Seconds in-flight RPCs get to finish after SIGTERM.
    shutdown_grace_seconds: float = Field(default=30.0, ge=0)
    tls: TlsSettings = TlsSettings()
    auth: AuthSettings = AuthSettings()

    @model_validator(mode="after")
    def _fail_closed(self) -> ServerSettings:
        if not _loopback(self.host) and not self.auth.enabled and not self.auth.disabled:
            raise ValueError(
                f"host {self.host!r} is reachable from other machines and auth is off: set "
                "auth.enabled with a tokens_file, or auth.disabled: true to serve without tokens "
                "on purpose"
            )
        return self


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


class LoggingSettings(_Section):
    """Log level and format."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    json_lines: bool = False


class S3Settings(_Section):
    """An S3-compatible object store. Credentials come from the usual AWS environment variables or
    instance roles, never from this file."""

    bucket: str = ""
    prefix: str = "tunefleet"
    endpoint_url: str | None = None
    region: str | None = None


ServiceKey = Literal["datasets", "training", "adapters", "inference", "evaluation", "retraining"]


class StorageSettings(_Section):
    """Where metadata and blobs live."""

    # SQLAlchemy URL; empty means a SQLite file in the data directory.
    database_url: str = ""
    # A database of its own for some services ({datasets, training, adapters, inference: URL});
    # the others use database_url. Services never read each other's tables, so each may move.
    databases: dict[ServiceKey, str] = {}
    # How long a SQLite writer waits for another's lock before the call is UNAVAILABLE.
    sqlite_busy_timeout_seconds: float = Field(default=30.0, gt=0)
    blob_backend: Literal["local", "s3"] = "local"
    # For the local backend; empty means `blobs/` in the data directory.
    blob_dir: Path | None = None
    s3: S3Settings = S3Settings()
    # An upload finishing writes about this many times the working files it wrote while
    # streaming (records file, blob copy); each claims that space as it streams and is refused
    # (RESOURCE_EXHAUSTED INSUFFICIENT_SPACE) rather than leave under `min_free_bytes` free on
    # the data volume. 0: no accounting.
    upload_space_factor: float = Field(default=2.0, ge=0)
    min_free_bytes: int = Field(default=256 * MiB, ge=0)

    @model_validator(mode="after")
    def _s3(self) -> StorageSettings:
        if self.blob_backend == "s3" and not self.s3.bucket:
            raise ValueError("s3.bucket is required when blob_backend is 's3'")
        return self


class AdapterSettings(_Section):
    """The adapter registry."""

    # Compatibility reports mark adapters of higher rank as not servable by vLLM.
    vllm_max_lora_rank: LoraRank = 64
    # Load each new adapter on its base model (when the weights are here) and check that it
    # changes the logits.
    smoke_test: bool = True
    # WatchAdapterChanges streams one client (its token, or its address without auth) may hold.
    max_watchers_per_client: int = Field(default=64, ge=1)
    # QuantizeModelVersion refuses an export whose most likely next token differs from its
    # source's on more than this share of the check's positions (unless asked to keep it).
    export_min_agreement: float = Field(default=0.95, gt=0, le=1)


class KubernetesSettings(_Section):
    """The Kubernetes launcher: one batch/v1 Job per training run."""

    namespace: str = "tunefleet"
    # A kubeconfig file; unset uses the in-cluster service account (the Deployment's shape).
    kubeconfig: Path | None = None
    # The trainer image: tunefleet with the [train] extra and a CUDA torch.
    image: str = "ghcr.io/tunefleet/tunefleet-trainer:0.1.0"
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    service_account: str = "tunefleet-trainer"
    node_selector: dict[str, str] = {}
    # The node label a job's `resources.gpu_type` is matched against.
    gpu_type_label: str = "nvidia.com/gpu.product"
    tolerations: list[dict[str, Any]] = [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]
    # A PersistentVolumeClaim holding base models, mounted read-only at `model_cache_path`; the
    # `models` catalogue should name directories under it.
    model_cache_claim: str = ""
    model_cache_path: str = "/models"
    # Scratch space (an emptyDir) for the run's output and local checkpoints.
    scratch_size_bytes: int = Field(default=100 * GiB, ge=GiB)
    # Pod retries (preemption, node loss) before the Job fails; the trainer resumes each retry
    # from its last stored checkpoint.
    backoff_limit: int = Field(default=3, ge=0, le=100)
    # Deadline when a job asks for none.
    active_deadline_seconds: int = Field(default=7 * 24 * 3600, ge=60)
    ttl_seconds_after_finished: int = Field(default=24 * 3600, ge=0)
    # Secrets whose keys become the trainer's environment (for example S3 credentials).
    env_from_secrets: list[str] = []
    # Defaults for jobs that do not ask.
    cpu_cores: float = Field(default=8.0, gt=0)
    memory_bytes: int = Field(default=64 * GiB, ge=256 * MiB)
    # Kueue: the LocalQueue (in `namespace`) that runs the Jobs. They are created suspended
    # with its `kueue.x-k8s.io/queue-name` label, and run when Kueue admits them; Kueue's
    # preemption suspends them again (the job waits QUEUED and resumes from its checkpoint).
    # `training.max_running_jobs` still caps the Jobs created. Empty: no Kueue.
    queue_name: str = ""
    # Kueue WorkloadPriorityClasses by the least job priority that gets each, for example
    # {"high": 10, "normal": 0}: priority 10 and above is "high", 0 to 9 "normal", below 0 none.
    priority_classes: dict[str, int] = {}


def _grader_name(value: str) -> str:
    if value not in GRADER_NAMES:
        raise ValueError(f"must be one of {', '.join(map(repr, GRADER_NAMES))}")
    return value


GraderName = Annotated[str, AfterValidator(_grader_name)]


class AfterTrainingSettings(_Section):
    """An evaluation TrainingService creates on EvaluationService for every version a training
    job registers: the version against the base model (the baseline) on the job's validation
    data, with a gate on `gate_metric`. Off by default."""

    enabled: bool = False
    # gRPC address of the EvaluationService; empty: this server's own address (the embedded
    # shape).
    endpoint: str = ""
    # Graders by name (those that take no options).
    graders: list[GraderName] = ["exact_match", "token_f1"]
    # The gate: the version must be significantly better than the base model on this grader
    # (one of `graders`), by at least `min_improvement`.
    gate_metric: str = "exact_match"
    min_improvement: float = Field(default=0.0, ge=0)
    # Validation items evaluated (the first this many) and tokens per answer.
    max_items: int = Field(default=200, ge=1)
    max_tokens: int = Field(default=128, ge=1)
    # The regression pass: a general-skills dataset (`tunefleet eval suite general --upload`
    # makes the bundled suite one, all in its train split), `datasets/{dataset}`, on which the
    # version is compared with the base model too: answers graded `string_check` `like`
    # normalised (named `general`), and `kl_from_base`. Empty: no regression pass.
    regression_dataset: str = ""
    regression_max_tokens: int = Field(default=32, ge=1)

    @model_validator(mode="after")
    def _gate_graded(self) -> AfterTrainingSettings:
        if self.gate_metric not in self.graders:
            raise ValueError(f"gate_metric {self.gate_metric!r} is not one of graders")
        return self


class TrainingSettings(_Section):
    """TrainingService: where jobs run, how many at once, and how workers reach the platform."""

    launcher: Literal["local", "kubernetes"] = "local"
    # Runs at once per launcher; more jobs wait in the queue (priority, then creation order).
    max_running_jobs: int = Field(default=1, ge=1)
    # GPUs the local launcher may hand to its processes (0: CPU only). Each run gets GPUs of its
    # own (CUDA_VISIBLE_DEVICES); the job at the head of the queue, and those behind it, wait
    # until as many are free as it asks for.
    local_gpus: int = Field(default=0, ge=0)
    # Most GPUs one job may ask for (per node), and most nodes (Kubernetes).
    max_gpus_per_job: int = Field(default=8, ge=1)
    max_nodes_per_job: int = Field(default=16, ge=1)
    # Memory per GPU for the fit check when a job names no `gpu_type` and no memory.
    gpu_memory_bytes: int = Field(default=80 * GiB, ge=GiB)
    # Memory per GPU by type, for jobs that name one.
    gpu_types: dict[str, int] = {
        "nvidia-h200-141gb": 141 * GiB,
        "nvidia-h100-80gb": 80 * GiB,
        "nvidia-a100-80gb": 80 * GiB,
        "nvidia-a100-40gb": 40 * GiB,
        "nvidia-l40s": 48 * GiB,
        "nvidia-l4": 24 * GiB,
        "nvidia-a10g": 24 * GiB,
        "nvidia-t4": 16 * GiB,
    }
    # gRPC address workers report to (TrainingService); empty: this server's own address.
    worker_endpoint: str = ""
    # gRPC address of the AdapterService workers register their results with (the gateway or
    # the adapters Service); empty: this server's own address, which needs AdapterService in
    # this process (the embedded shape).
    registry_endpoint: str = ""
    # gRPC address of the DatasetService jobs' datasets are checked and leased on; empty: this
    # server's own address (the embedded shape).
    datasets_endpoint: str = ""
    # A writer token workers use to register results when authentication is on.
    worker_registry_token: str = ""
    # TrainingService's own token for DatasetService (datasets, leases) and AdapterService
    # (adapters, registrations the workers left); empty: worker_registry_token.
    service_token: str = ""
    # Checkpoints kept per job: the newest this many and the best; older ones are deleted (the
    # trainer's local copies and the stored ones).
    keep_checkpoints: int = Field(default=3, ge=1)
    # A running worker that sends nothing for this long fails its job (WORKER_SILENT).
    worker_timeout_seconds: float = Field(default=600.0, gt=0)
    # How often workers send a heartbeat between reports.
    heartbeat_seconds: float = Field(default=30.0, gt=0)
    # How often the scheduler looks at the queue and the launcher.
    poll_seconds: float = Field(default=2.0, gt=0)
    # Several replicas: which one schedules (tunefleet.training.leadership). none: one replica;
    # database: a lease row in the training database (replicas sharing it); kubernetes: a
    # coordination.k8s.io/v1 Lease in kubernetes.namespace. Another replica takes over within
    # leader_lease_seconds + leader_renew_seconds of the leader's death.
    leader_election: Literal["none", "database", "kubernetes"] = "none"
    leader_lease_seconds: float = Field(default=10.0, ge=2)
    leader_renew_seconds: float = Field(default=2.0, gt=0)
    kubernetes: KubernetesSettings = KubernetesSettings()
    evaluation: AfterTrainingSettings = AfterTrainingSettings()

    @model_validator(mode="after")
    def _leases(self) -> TrainingSettings:
        if self.leader_election != "none" and not self.worker_endpoint:
            raise ValueError(
                "worker_endpoint is required with leader_election: workers report to any "
                "replica, so name an address that outlives one (the training Service, or "
                "ipv4:host1:port1,host2:port2)"
            )
        if self.leader_renew_seconds * 2 > self.leader_lease_seconds:
            raise ValueError(
                "leader_renew_seconds must be at most half of leader_lease_seconds (a leader "
                "must renew its lease at least twice before it would expire)"
            )
        return self


class EvaluationSettings(_Section):
    """EvaluationService: where it reads items and has candidates answer them."""

    # gRPC address of the DatasetService items are read from; empty: this server's own address
    # (the embedded shape).
    datasets_endpoint: str = ""
    # gRPC address of the InferenceService candidates answer through; empty: this server's own.
    inference_endpoint: str = ""
    # EvaluationService's token for both (a reader token) when authentication is on.
    service_token: str = ""
    # Generate requests in flight at once per job.
    concurrency: int = Field(default=8, ge=1, le=256)
    # Jobs run at once; more wait in the queue, oldest first.
    max_running_jobs: int = Field(default=2, ge=1)
    # The directory of external endpoints' API keys, one file per secret (a mounted Kubernetes
    # Secret); a job names the file in `endpoint.api_key_secret`.
    secrets_dir: str = ""


class RetrainingSettings(_Section):
    """RetrainingService: how it reaches the other services and how often it looks at triggers."""

    # gRPC address of the services a run calls (feedback, datasets, training, evaluation,
    # adapters): the gateway in a cluster; empty: this server's own address (the embedded shape).
    endpoint: str = ""
    # RetrainingService's token for them (a writer token) when authentication is on.
    service_token: str = ""
    # How often policies' schedules and new-example thresholds are checked.
    trigger_seconds: float = Field(default=60.0, gt=0)
    # How often a run looks at the training and evaluation jobs it waits on.
    poll_seconds: float = Field(default=5.0, gt=0)
    # How often a run's canary counts the ratings of both versions' answers.
    canary_seconds: float = Field(default=60.0, gt=0)


class MlflowSettings(_Section):
    """Experiment records in MLflow (`runtime/experiments.py`): off without a tracking URI."""

    # The tracking server, such as http://mlflow:5000; empty: nothing is mirrored.
    tracking_uri: str = ""
    # The experiment training runs and evaluation jobs are recorded in.
    experiment: str = "tunefleet"
    # Tries of each write before it is logged and dropped (the platform keeps its own records).
    attempts: int = Field(default=5, ge=1, le=20)


class VllmSettings(_Section):
    """The vLLM engine's LoRA limits (see vLLM's engine arguments of the same names)."""

    max_loras: int = Field(default=8, ge=1)  # adapters in one batch
    max_lora_rank: LoraRank = 64
    max_cpu_loras: int = Field(default=32, ge=1)  # adapters kept in host memory
    # Longest prompt + generation; 0: the model's own context (max_position_embeddings).
    max_model_len: int = Field(default=0, ge=0)
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    dtype: str = "auto"


class InferenceSettings(_Section):
    """InferenceService: one base model, many adapters."""

    # The base model served, a name in `models`; empty: the service serves nothing.
    base_model: str = ""
    engine: Literal["peft", "vllm"] = "peft"
    # Serve adapters the main engine refuses (DoRA, bias, modules_to_save, large ranks on vLLM)
    # with a PEFT engine beside it, instead of refusing them.
    peft_fallback: bool = True
    # Adapter versions kept loaded; the least recently used unpinned one is evicted.
    max_loaded_adapters: int = Field(default=16, ge=1)
    # Aliases to route and follow from the start, as `adapters/{adapter}@{alias}`.
    aliases: list[str] = []
    # Most tokens one request may generate.
    max_tokens_limit: int = Field(default=4096, ge=1)
    # Most prompt tokens one request may send; 0: the model's context. Prompts are also
    # bounded by the context less the tokens asked for.
    max_prompt_tokens: int = Field(default=0, ge=0)
    # PEFT engine: device, dtype, rows decoded together, prompt tokens prefilled per step, and
    # the memory (MiB) for prompts' KV caches reused by later prompts that begin alike (a shared
    # system prompt, a chat's earlier turns); 0: no prefix caching.
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_batch: int = Field(default=16, ge=1)
    prefill_chunk_tokens: int = Field(default=256, ge=16)
    prefix_cache_mb: int = Field(default=256, ge=0)
    # gRPC address of the AdapterService whose versions are served and whose alias moves are
    # followed (the adapters Service); empty: this server's own address, which needs
    # AdapterService in this process (the embedded shape).
    registry_endpoint: str = ""
    # A reader token for those calls when authentication is on.
    registry_token: str = ""
    vllm: VllmSettings = VllmSettings()


class OpenAISettings(_Section):
    """The OpenAI-compatible HTTP front: `tunefleet serve openai` alone, and a part of the
    embedded `tunefleet serve` unless disabled."""

    # In the embedded `tunefleet serve` (`tunefleet serve openai` runs it regardless).
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)
    # The gRPC services it calls, host:port (the gateway); empty: this process's own server.
    target: str = ""
    target_tls: bool = False
    # A private CA to trust for `target` (implies TLS).
    target_ca_file: Path | None = None
    # The base model's id in /v1/models and in requests; empty: inference.base_model.
    base_model: str = ""
    # Deadline of each call to the services (a whole generation, an upload's included).
    request_timeout_seconds: float = Field(default=600.0, gt=0)


class Settings(BaseSettings):
    """Everything a tunefleet server process needs to start."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        extra="forbid",
    )

    # Embedded-shape state (SQLite file, local blobs, scratch space) lives here.
    data_dir: Path = Path(".tunefleet")
    # Models the platform knows: name -> local directory (tokenizers, base models).
    models: dict[str, Path] = {}
    # With auth on, requests may name a model folder instead of a name in `models` only under
    # these directories (none: names only); with auth off, any local model folder.
    model_roots: list[Path] = []
    server: ServerSettings = ServerSettings()
    logging: LoggingSettings = LoggingSettings()
    storage: StorageSettings = StorageSettings()
    adapters: AdapterSettings = AdapterSettings()
    training: TrainingSettings = TrainingSettings()
    inference: InferenceSettings = InferenceSettings()
    evaluation: EvaluationSettings = EvaluationSettings()
    retraining: RetrainingSettings = RetrainingSettings()
    mlflow: MlflowSettings = MlflowSettings()
    openai: OpenAISettings = OpenAISettings()

    @model_validator(mode="after")
    def _pods_reach_blobs(self) -> Settings:
        if self.training.launcher == "kubernetes" and self.storage.blob_backend == "local":
            raise ValueError(
                "training.launcher kubernetes needs storage.blob_backend s3: training Pods "
                "cannot read this machine's blob directory"
            )
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The YAML file, if any, is `model_config["yaml_file"]`, set by `load_settings`.
        return init_settings, env_settings, YamlConfigSettingsSource(settings_cls)

    @property
    def database_url(self) -> str:
        return self.storage.database_url or f"sqlite:///{self.data_dir / 'tunefleet.db'}"

    @property
    def work_dir(self) -> Path:
        """Scratch space for work in progress (upload spools); never shared between processes."""
        return self.data_dir / "work"

    @property
    def blob_dir(self) -> Path:
        return self.storage.blob_dir or self.data_dir / "blobs"


def load_settings(config_file: Path | None = None, **overrides: Any) -> Settings:
    """Load settings from the environment, an optional YAML file and `overrides`.

    Raises SettingsError naming every invalid setting.
    """
    if config_file is not None and not config_file.is_file():
        raise SettingsError(f"config file {str(config_file)!r} does not exist")
    settings_class = Settings
    if config_file is not None:

        class SettingsFromFile(Settings):
            model_config = SettingsConfigDict(yaml_file=config_file)

        settings_class = SettingsFromFile
    try:
        return settings_class(**overrides)
    except ValidationError as exc:
        raise SettingsError(_describe(exc)) from None


def _describe(exc: ValidationError) -> str:
    lines = []
    for error in exc.errors():
        path = ".".join(str(part) for part in error["loc"]) or "settings"
        env_name = ENV_PREFIX + ENV_NESTED_DELIMITER.join(
            str(part).upper() for part in error["loc"] if isinstance(part, str)
        )
        lines.append(f"{path} ({env_name}): {error['msg']}")
    return "invalid settings:\n  " + "\n  ".join(lines)
