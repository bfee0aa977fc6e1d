"""The local launcher (the embedded default): each run is a trainer subprocess on this machine.

Everything a run needs to be found again lives in its directory `RUNS/<job>/`: the spec (mode
0600: it holds the worker token), the trainer's stdout and stderr, `pid`, and `exit_code`, which
a small shell wrapper writes when the trainer ends. Runs are started in their own session, so
they outlive a restart of TrainingService; after one, a run is finished if `exit_code` exists,
running if its wrapper (with its spec on the command line) or another process of its group is
still there, and lost otherwise.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tunefleet.trainer import outcome
from tunefleet.training.launcher import (
    EXIT_REASONS,
    LogLine,
    Phase,
    Run,
    RunRequest,
    RunStatus,
    trainer_command,
)

log = logging.getLogger(__name__)

# Runs the trainer, then records its exit status where a restarted service can read it.
WRAPPER = '"$@"; code=$?; echo $code > exit_code.tmp && mv exit_code.tmp exit_code; exit $code'
STREAMS = ("stdout", "stderr")
OUTCOME = "outcome.json"  # the trainer's outcome (tunefleet.trainer.outcome)
MAX_LINE = 4096


class LocalLauncher:
    name = "local"

    def __init__(
        self,
        runs_dir: Path,
        python: str = sys.executable,
        stop_grace_seconds: float = 10.0,
        max_log_lines: int = 500,
    ) -> None:
        self.runs_dir = runs_dir
        self.python = python
        self.stop_grace_seconds = stop_grace_seconds
        self.max_log_lines = max_log_lines
        self._children: dict[str, subprocess.Popen[bytes]] = {}
        self._wake: Callable[[], None] = lambda: None

    async def start(self, wake: Callable[[], None]) -> None:
        self._wake = wake

    async def close(self) -> None:
        """Runs keep going: a restarted service finds them again."""

    async def launch(self, request: RunRequest) -> Run:
        return await asyncio.to_thread(self._launch, request)

    def _launch(self, request: RunRequest) -> Run:
        directory = self.runs_dir / request.job_id
        pid_file = directory / "pid"
        if pid_file.exists():  # started before a restart: never start a second one
            return Run(pid_file.read_text().strip(), {"dir": str(directory)})
        directory.mkdir(parents=True, exist_ok=True)
        spec_path = directory / "spec.json"
        descriptor = os.open(spec_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as file:
            json.dump({**request.spec, "output_dir": str((directory / "output").resolve())}, file)
        env = {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "TUNEFLEET_RESULT_FILE": str((directory / OUTCOME).resolve()),
        }
        # The run sees its own GPUs only (none for a CPU run), numbered from 0 in the run. (A
        # launch recorded before GPUs were assigned, repeated after an upgrade, sees them all.)
        if request.devices or request.gpu_count == 0:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(d) for d in request.devices)
        command = trainer_command(self.python, request.gpu_count, str(spec_path.resolve()))
        with (
            (directory / "stdout.log").open("ab") as out,
            (directory / "stderr.log").open("ab") as err,
        ):
            process = subprocess.Popen(
                ["/bin/sh", "-c", WRAPPER, "sh", *command],
                cwd=directory,
                stdout=out,
                stderr=err,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        temporary = directory / "pid.tmp"
        temporary.write_text(str(process.pid))
        temporary.rename(pid_file)
        self._children[request.job_id] = process
        threading.Thread(target=self._reap, args=(process,), daemon=True).start()
        log.info("started the trainer for job %s as pid %d", request.job_id, process.pid)
        return Run(str(process.pid), {"dir": str(directory), "oom_kills": _oom_kills() or 0})

    def _reap(self, process: subprocess.Popen[bytes]) -> None:
        process.wait()
        self._wake()

    async def status(self, run: Run) -> RunStatus:
        return await asyncio.to_thread(self._status, run)

    def _status(self, run: Run) -> RunStatus:
        directory = Path(run.state["dir"])
        ended = self._ended(run, directory)
        if ended is not None:
            return ended
        if _group_alive(int(run.run_id), directory):
            return RunStatus(Phase.RUNNING)
        # The wrapper may have written its exit status and ended since the first look.
        ended = self._ended(run, directory)
        if ended is not None:
            return ended
        return RunStatus(
            Phase.FAILED,
            "WORKER_LOST",
            f"the trainer process {run.run_id} ended without an exit status (killed)"
            + _last(directory),
        )

    def _ended(self, run: Run, directory: Path) -> RunStatus | None:
        """The status of a run whose wrapper recorded the trainer's exit status, else None."""
        exit_file = directory / "exit_code"
        if not exit_file.exists():
            return None
        code = int(exit_file.read_text().strip() or "-1")
        said = _outcome(directory)
        if code == 0:
            return RunStatus(
                Phase.SUCCEEDED,
                output_adapter_version=str(said.get("adapter_version", "")),
                output_request=str(said.get("output_request", "")),
            )
        reason = EXIT_REASONS.get(code, "WORKER_EXITED")
        if code == 137 and _oom_killed(directory, run.state):
            reason, why = "OUT_OF_MEMORY", ": killed by the kernel's out-of-memory killer"
        else:
            why = f": {said['message']}" if said.get("message") else _last(directory)
        return RunStatus(
            Phase.FAILED,
            reason,
            f"the trainer exited with status {code}{why}",
            output_request=str(said.get("output_request", "")),
        )

    async def cancel(self, run: Run) -> None:
        await asyncio.to_thread(self._cancel, run)

    def _cancel(self, run: Run) -> None:
        """SIGTERM to the run's process group (with SIGCONT, so that a stopped trainer sees it),
        SIGKILL to the group after the grace; done when no process of the group is left."""
        pid, directory = int(run.run_id), Path(run.state["dir"])
        for sig, wait in ((signal.SIGTERM, self.stop_grace_seconds), (signal.SIGKILL, 5.0)):
            if not _group_alive(pid, directory):
                return
            try:
                os.killpg(pid, sig)
                if sig == signal.SIGTERM:
                    os.killpg(pid, signal.SIGCONT)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline and _group_alive(pid, directory):
                child = self._children.get(directory.name)
                if child is not None:
                    child.poll()
                time.sleep(0.1)

    async def logs(self, run: Run, cursor: dict[str, Any]) -> tuple[list[LogLine], dict[str, Any]]:
        return await asyncio.to_thread(self._logs, run, cursor)

    def _logs(self, run: Run, cursor: dict[str, Any]) -> tuple[list[LogLine], dict[str, Any]]:
        directory, after = Path(run.state["dir"]), dict(cursor)
        lines: list[LogLine] = []
        for stream in STREAMS:
            path = directory / f"{stream}.log"
            if not path.exists():
                continue
            offset = int(cursor.get(stream, 0))
            with path.open("rb") as file:
                file.seek(offset)
                data = file.read(1024 * 1024)
            complete = data[: data.rfind(b"\n") + 1]
            taken = 0
            for raw in complete.splitlines(keepends=True):
                if len(lines) >= self.max_log_lines:
                    break
                taken += len(raw)
                text = raw.rstrip(b"\r\n").decode("utf-8", "replace")[:MAX_LINE]
                lines.append(LogLine(stream, text))
            after[stream] = offset + taken
        return lines, after

    async def checkpoint_saved(self, run: Run, uri: str) -> None:
        """Local runs are not retried."""


def _alive(pid: int, directory: Path) -> bool:
    """Whether `pid` is still this run's process (a reused pid has another command line)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return str((directory / "spec.json").resolve()).encode() in cmdline


def _group_alive(pgid: int, directory: Path) -> bool:
    """Whether any process of the run's process group is left (not a zombie). The wrapper shell
    may be gone while the trainer it started (stopped, or ignoring SIGTERM) is not."""
    if _alive(pgid, directory):
        return True
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # After the command name: state, ppid, pgrp.
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def _outcome(directory: Path) -> dict[str, Any]:
    """What the trainer left in its outcome file (see tunefleet.trainer.outcome)."""
    try:
        return outcome.read((directory / OUTCOME).read_text())
    except OSError:
        return {}


def _oom_killed(directory: Path, state: dict[str, Any]) -> bool:
    """Whether the kernel's OOM killer killed a process of this cgroup since the run started
    (cgroup v2 `memory.events`; False where that cannot be read)."""
    now = _oom_kills()
    return now is not None and now > int(state.get("oom_kills", now))


def _oom_kills() -> int | None:
    try:
        cgroup = Path("/proc/self/cgroup").read_text().strip().split("::", 1)[1]
        events = Path(f"/sys/fs/cgroup{cgroup}/memory.events").read_text()
    except (OSError, IndexError):
        return None
    for line in events.splitlines():
        key, _, value = line.partition(" ")
        if key == "oom_kill":
            return int(value)
    return None


def _last(directory: Path) -> str:
    """The last line of the trainer's stderr, to say why it ended."""
    try:
        with (directory / "stderr.log").open("rb") as file:
            file.seek(max(0, file.seek(0, os.SEEK_END) - 4096))
            tail = file.read().decode("utf-8", "replace").strip().splitlines()
    except OSError:
        return ""
    return f": {tail[-1][:500]}" if tail else ""
