"""The interface between TrainingService and where training runs: a local process or a
Kubernetes Job (or, in unit tests, a fake).

A launcher starts one run per job and answers what became of it. Launching is idempotent per
job: asking again for a job whose run exists returns that run, so a service that crashed between
starting a run and recording it never starts a second one.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class RunRequest:
    """What to run for a job: the trainer spec and the resources it asked for."""

    job_id: str
    spec: dict[str, Any]  # the trainer spec (JSON), holding the job's worker token
    gpu_count: int = 0  # of each node
    node_count: int = 1
    devices: tuple[int, ...] = ()  # the local launcher's: which of its GPUs the run gets
    priority: int = 0  # the job's
    gpu_type: str = ""
    cpu_cores: float = 0.0  # 0: the launcher's default
    memory_bytes: int = 0  # 0: the launcher's default
    max_run_seconds: int = 0  # 0: the launcher's default


@dataclass(frozen=True)
class Run:
    """A started run: the id users see (a process id, a Job name) and what the launcher needs to
    find it again after a restart."""

    run_id: str
    state: dict[str, Any] = field(default_factory=dict)


class Phase(enum.Enum):
    PENDING = "pending"  # accepted, waiting for capacity (for example an unscheduled Pod)
    RUNNING = "running"
    SUCCEEDED = "succeeded"  # ended cleanly (exit status 0, Job complete)
    FAILED = "failed"  # ended otherwise; `reason` and `message` say how
    MISSING = "missing"  # the launcher knows nothing of the run


@dataclass(frozen=True)
class RunStatus:
    phase: Phase
    reason: str = ""  # UPPER_SNAKE_CASE, for the job's error
    message: str = ""
    retries: int = 0  # failed attempts the launcher retried (a preempted Pod)
    # The registered result the worker left behind, in case its final report never reached
    # the service (it was down); the stored registration request of a result it trained but
    # could not register, for the service to send itself.
    output_adapter_version: str = ""
    output_request: str = ""


@dataclass(frozen=True)
class LogLine:
    stream: str  # stdout or stderr
    text: str


class JobLauncher(Protocol):
    name: str  # "local" or "kubernetes", shown in TrainingJob.launcher

    async def start(self, wake: Any) -> None:
        """Begin watching runs; call `wake()` (from any thread) when something changed."""

    async def close(self) -> None: ...

    async def launch(self, request: RunRequest) -> Run: ...

    async def status(self, run: Run) -> RunStatus: ...

    async def cancel(self, run: Run) -> None:
        """Stop the run and remove what it left running; idempotent."""

    async def logs(self, run: Run, cursor: dict[str, Any]) -> tuple[list[LogLine], dict[str, Any]]:
        """Lines printed since `cursor` (empty: from the start) and the cursor after them."""

    async def checkpoint_saved(self, run: Run, uri: str) -> None:
        """A checkpoint was stored: a retried run should resume from `uri`."""


@dataclass(frozen=True)
class Nodes:
    """Where the nodes of a multi-node run meet: `count` of them, this one's `rank` (a number, or
    `$(NODE_RANK)` for Kubernetes to fill in from the Pod's index), and the first node's address,
    which holds torchrun's store (global rank 0, which reports, checkpoints and registers, runs
    there)."""

    count: int
    rank: str
    address: str
    port: int


def trainer_command(
    python: str, gpu_count: int, spec_path: str, nodes: Nodes | None = None
) -> list[str]:
    """The worker's command line: the trainer, under torchrun (one process per GPU of a node,
    through tunefleet.trainer.gang, which exits with the first failed process's status) when
    the run has more than one GPU or more than one node."""
    trainer = ["-m", "tunefleet.trainer", "--spec", spec_path]
    if nodes is not None and nodes.count > 1:
        meeting = [
            f"--nnodes={nodes.count}",
            f"--node-rank={nodes.rank}",
            f"--master-addr={nodes.address}",
            f"--master-port={nodes.port}",
        ]
    elif gpu_count > 1:
        meeting = ["--standalone"]
    else:
        return [python, *trainer]
    gang = [python, "-m", "tunefleet.trainer.gang", *meeting]
    return [*gang, f"--nproc-per-node={max(gpu_count, 1)}", *trainer]


# The trainer's exit statuses (see tunefleet.trainer.__main__).
EXIT_REASONS = {
    1: "TRAINER_FAILED",
    2: "INVALID_SPEC",
    3: "CANCELLED",
    4: "REGISTRATION_FAILED",
    5: "OUT_OF_MEMORY",
}
