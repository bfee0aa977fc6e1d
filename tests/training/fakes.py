"""A launcher for unit tests only: runs are records whose phase the test sets."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from tunefleet.training.launcher import LogLine, Phase, Run, RunRequest, RunStatus


@dataclass
class FakeRun:
    request: RunRequest
    phase: Phase = Phase.PENDING
    reason: str = ""
    message: str = ""
    retries: int = 0
    lines: list[LogLine] = field(default_factory=list)
    cancelled: bool = False
    resume_from: str = ""
    output_adapter_version: str = ""  # what the worker left behind (its outcome)
    output_request: str = ""

    @property
    def token(self) -> str:
        return str(self.request.spec["report"]["token"])


class FakeLauncher:
    """Keeps its runs across a TrainingService restart, as a cluster would."""

    name = "fake"

    def __init__(self, start_phase: Phase = Phase.RUNNING) -> None:
        self.start_phase = start_phase
        self.runs: dict[str, FakeRun] = {}
        self.launches = 0
        self.cancelled: FakeRun | None = None  # the last run cancelled
        self.wake: Callable[[], None] = lambda: None

    async def start(self, wake: Callable[[], None]) -> None:
        self.wake = wake

    async def close(self) -> None:
        pass

    async def launch(self, request: RunRequest) -> Run:
        self.launches += 1
        if request.job_id not in self.runs:  # idempotent per job, like the real launchers
            self.runs[request.job_id] = FakeRun(request, self.start_phase)
        return Run(f"fake-{request.job_id}", {"job": request.job_id})

    async def status(self, run: Run) -> RunStatus:
        fake = self.runs.get(run.state["job"])
        if fake is None:
            return RunStatus(Phase.MISSING)
        return RunStatus(
            fake.phase,
            fake.reason,
            fake.message,
            fake.retries,
            fake.output_adapter_version,
            fake.output_request,
        )

    async def cancel(self, run: Run) -> None:
        fake = self.runs.pop(run.state["job"], None)
        if fake is not None:
            fake.cancelled = True
            self.cancelled = fake
        self.wake()

    async def logs(self, run: Run, cursor: dict[str, Any]) -> tuple[list[LogLine], dict[str, Any]]:
        fake = self.runs.get(run.state["job"])
        seen = int(cursor.get("seen", 0))
        if fake is None:
            return [], cursor
        return fake.lines[seen:], {"seen": len(fake.lines)}

    async def checkpoint_saved(self, run: Run, uri: str) -> None:
        fake = self.runs.get(run.state["job"])
        if fake is not None:
            fake.resume_from = uri

    def finish(
        self,
        job: str,
        phase: Phase,
        reason: str = "",
        message: str = "",
        output_adapter_version: str = "",
        output_request: str = "",
    ) -> None:
        fake = self.runs[job.removeprefix("trainingJobs/")]
        fake.phase, fake.reason, fake.message = phase, reason, message
        fake.output_adapter_version, fake.output_request = output_adapter_version, output_request
        self.wake()
