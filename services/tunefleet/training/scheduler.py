"""TrainingService's scheduler: one loop per service process (run `TrainingService` with one
replica) that launches queued jobs while the launcher has room (priority first, then creation
order), follows launched runs (state, log lines), fails runs whose worker went silent, takes and
releases the jobs' dataset leases on DatasetService (after creating the evaluation of a version a
job registered, when the service evaluates after training), and, when the service starts, reconciles
every unfinished job with what the launcher reports: a run that ended while the service was down
gets its final state, one still running is followed again, and a job whose launch was
interrupted is launched with the same request, which launchers treat as idempotent."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import secrets
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from tunefleet.core.errors import NotFound, TunefleetError, Unavailable
from tunefleet.core.tasks import cancel
from tunefleet.runtime.settings import TrainingSettings
from tunefleet.runtime.streams import ChangeSignal
from tunefleet.storage.database import Database, utcnow
from tunefleet.training import store
from tunefleet.training.launcher import JobLauncher, LogLine, Phase, Run, RunRequest, RunStatus
from tunefleet.training.leadership import Leadership
from tunefleet.training.metrics import TrainingMetrics
from tunefleet.training.peers import (
    AdapterServiceClient,
    DatasetServiceClient,
    EvaluationServiceClient,
    RegistrationRefused,
    RegistryUnavailable,
)
from tunefleet.training.reports import digest
from tunefleet.training.states import JobStates, run_of, topic
from tunefleet.training.store import TERMINAL, JobRow, LaunchState, State
from tunefleet.v1 import training_job_pb2

log = logging.getLogger(__name__)

TrainingJob = training_job_pb2.TrainingJob


class Scheduler:
    def __init__(
        self,
        db: Database,
        training: TrainingSettings,
        launcher: JobLauncher,
        metrics: TrainingMetrics,
        states: JobStates,
        signal: ChangeSignal,
        datasets: DatasetServiceClient,
        registry: AdapterServiceClient,
        evaluations: EvaluationServiceClient,
        leadership: Leadership | None = None,
    ) -> None:
        self.db, self.training, self.launcher, self.metrics = db, training, launcher, metrics
        self.leadership = leadership or Leadership()
        self.states, self.signal = states, signal
        self.datasets, self.registry, self.evaluations = datasets, registry, evaluations
        self.worker_endpoint = training.worker_endpoint
        self._leasing = asyncio.Lock()
        self._settling: dict[str, asyncio.Task[None]] = {}
        self.started_at = utcnow()
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._background: set[asyncio.Task[None]] = set()

    async def start(self, worker_endpoint: str) -> None:
        """Reconcile with the launcher, then run until `stop()` (ticking while this replica
        leads: see tunefleet.training.leadership)."""
        self.worker_endpoint = self.worker_endpoint or worker_endpoint
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self.started_at = utcnow()
        await self.launcher.start(self.wake)
        await self.leadership.start(self._leading)
        if self.leadership.leading:
            await self.tick()
        self._task = asyncio.create_task(self._loop_forever(), name="training-scheduler")

    def _leading(self, leading: bool) -> None:
        if not leading:
            self.metrics.follower()
        else:
            self.metrics.leader.set(1)
            # Taking over: the silence clock starts again (reports may have failed while the
            # last leader died), and the first tick is now.
            self.started_at = utcnow()
            self.wake()

    async def stop(self) -> None:
        if self._task is not None:
            await cancel(self._task)
            self._task = None
        await self.leadership.stop()
        self._loop = None
        for task in list(self._settling.values()):
            await cancel(task)
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)

    def wake(self) -> None:
        """Ask the scheduler to look now (from any thread)."""
        if self._loop is not None and self._wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop closed: the service stopped
                self._loop.call_soon_threadsafe(self._wake.set)

    async def _loop_forever(self) -> None:
        assert self._wake is not None
        while True:
            # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancellation
            # that arrives as its wait ends, and stop() would wait for this loop forever.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.training.poll_seconds):
                    await self._wake.wait()
            self._wake.clear()
            if not self.leadership.leading:
                continue
            try:
                await self.tick()
            except Exception:
                log.exception("training scheduler tick failed; retrying")

    async def tick(self) -> None:
        """One look at every unfinished job: follow launched runs, fail silent workers, launch
        queued jobs while there is room; lease datasets for new jobs and release those of ended
        ones."""
        for row in await asyncio.to_thread(self._ended_holding_leases):
            await self._release(row)
        for row in await asyncio.to_thread(self._active):
            if row.lease_state == store.LEASES_WANTED:
                await self.lease(row.id)
        for row in await asyncio.to_thread(self._active):
            run = run_of(row)
            if run is not None:
                await self._follow(row, run)
            elif row.launch.launching:
                await self._launch(row)  # interrupted by a restart: same request, same run
        for row in await asyncio.to_thread(self._active):
            if row.state == "RUNNING":
                await self._check_silence(row)
        rows = await asyncio.to_thread(self._active)
        started = [row for row in rows if run_of(row) or row.launch.launching]
        busy, held = len(started), {d for row in started for d in row.launch.devices}
        for row in rows:
            if busy >= self.training.max_running_jobs or not self.leadership.leading:
                break
            if (
                row.state == "QUEUED"
                and row.lease_state == store.LEASES_HELD
                and not run_of(row)
                and not row.launch.launching
            ):
                devices = self._devices(row, held)
                if devices is None:
                    break  # in queue order: the jobs behind wait too, so it is not starved
                await self._launch(row, devices)
                busy, held = busy + 1, held | set(devices)
        await asyncio.to_thread(self._count)

    def _devices(self, row: JobRow, held: set[int]) -> list[int] | None:
        """The local GPUs for a job, of those no run holds; None while too few are free. (A
        cluster places its Pods on GPUs itself: no devices.)"""
        wanted = row.job().resources.gpu_count
        if self.training.launcher != "local" or not wanted:
            return []
        free = [d for d in range(self.training.local_gpus) if d not in held]
        return free[:wanted] if len(free) >= wanted else None

    async def lease(self, job_id: str) -> None:
        """Lease the datasets of a job that wants its leases. A dataset deleted since the job was
        checked fails the job; DatasetService not answering leaves it for the next tick."""
        async with self._leasing:
            row = await asyncio.to_thread(self._row, job_id)
            job = row.job()
            if row.lease_state != store.LEASES_WANTED or job.state in TERMINAL:
                return
            for dataset in datasets_of(job):
                try:
                    await self.datasets.lease(dataset, job_id, job.name)
                except NotFound:
                    error = training_job_pb2.JobError(
                        reason="DATASET_DELETED",
                        message=f"{dataset} was deleted before the job could lease it",
                    )
                    await asyncio.to_thread(self.states.end, job_id, State.STATE_FAILED, error)
                    break
                except TunefleetError as error:
                    log.warning("cannot lease %s for %s yet: %s", dataset, job.name, error)
                    return
            await asyncio.to_thread(self._lease_state, job_id, store.LEASES_HELD)

    async def _release(self, row: JobRow) -> None:
        """Delete the leases of a job that ended; DatasetService not answering leaves them for
        the next tick. The evaluation of its version is created first (while the data is still
        leased), and EvaluationService not answering leaves both for the next tick."""
        if not await self._evaluate(row):
            return
        async with self._leasing:
            for dataset in datasets_of(row.job()):
                try:
                    await self.datasets.release(dataset, row.id)
                except TunefleetError as error:
                    log.warning("cannot release %s for %s yet: %s", dataset, row.name, error)
                    return
            await asyncio.to_thread(self._lease_state, row.id, store.LEASES_RELEASED)

    async def _evaluate(self, row: JobRow) -> bool:
        """Create the evaluations of the version a succeeded SFT job registered, when the service
        evaluates after training, and note their names on the job; False when EvaluationService
        did not answer (try again). A refusal (a job without validation data, say) is logged and
        the job keeps no evaluation: training succeeded either way."""
        job = row.job()
        if (
            not self.training.evaluation.enabled
            or job.state != State.STATE_SUCCEEDED
            or not job.output_adapter_version
            or job.evaluation_jobs
            or job.objective == training_job_pb2.TRAINING_OBJECTIVE_DPO
        ):
            return True
        try:
            names = await self.evaluations.evaluate(row.id, job)
        except Unavailable as error:
            log.warning("cannot create the evaluation of %s yet: %s", job.name, error)
            return False
        except TunefleetError as error:
            log.warning("EvaluationService refused to evaluate %s: %s", job.name, error)
            return True
        await asyncio.to_thread(self._note_evaluations, row.id, names)
        log.info("%s: %s evaluate %s", job.name, ", ".join(names), job.output_adapter_version)
        return True

    def _note_evaluations(self, job_id: str, names: list[str]) -> None:
        with self.db.session() as session:
            row = store.get(session, job_id, for_update=True)
            job = row.job()
            job.evaluation_jobs[:] = names
            row.store(job)
        self.signal.notify()

    def _row(self, job_id: str) -> JobRow:
        with self.db.read() as session:
            row = store.get(session, job_id)
            session.expunge(row)
            return row

    def _lease_state(self, job_id: str, state: str) -> None:
        with self.db.session() as session:
            store.get(session, job_id, for_update=True).lease_state = state

    def _ended_holding_leases(self) -> list[JobRow]:
        with self.db.read() as session:
            rows = store.ended_holding_leases(session)
            for row in rows:
                session.expunge(row)
            return rows

    def _active(self) -> list[JobRow]:
        with self.db.read() as session:
            rows = store.active(session)
            for row in rows:
                session.expunge(row)
            return rows

    def _count(self) -> None:
        with self.db.read() as session:
            counts = dict(
                session.execute(select(JobRow.state, func.count()).group_by(JobRow.state)).all()
            )
            waiting = sum(
                1
                for row in store.active(session)
                if row.state == "QUEUED" and not row.job().launcher_run_id
            )
        self.metrics.counts({str(k): int(v) for k, v in counts.items()}, waiting)

    async def _launch(self, row: JobRow, devices: list[int] | None = None) -> None:
        """Launch a job's run on `devices` (None: a launch interrupted by a restart, repeated
        on the devices it had)."""
        token = row.launch.token or secrets.token_urlsafe(32)
        devices = row.launch.devices if devices is None else devices
        marked = await asyncio.to_thread(self._mark_launching, row.id, token, devices)
        if marked is None:
            return
        marked_row, resume_from = marked
        spec = dict(marked_row.worker_spec)
        endpoint = self.worker_endpoint
        spec["report"] = {
            **spec["report"],
            "endpoint": endpoint,
            "token": token,
            "heartbeat_seconds": self.training.heartbeat_seconds,
        }
        assert self.registry is not None, "start() the manager first"
        spec["registry"] = {
            **spec["registry"],
            "endpoint": self.registry.endpoint,
            "token": self.training.worker_registry_token,
        }
        spec["keep_checkpoints"] = self.training.keep_checkpoints
        if resume_from:
            spec["resume_from"] = resume_from
        resources = marked_row.job().resources
        request = RunRequest(
            job_id=row.id,
            spec=spec,
            gpu_count=resources.gpu_count,
            node_count=max(resources.node_count, 1),
            devices=tuple(devices),
            priority=marked_row.priority,
            gpu_type=resources.gpu_type,
            cpu_cores=resources.cpu_cores,
            memory_bytes=resources.memory_bytes,
            max_run_seconds=resources.max_run_duration.seconds,
        )
        try:
            run = await self.launcher.launch(request)
        except Exception as error:
            log.exception("launching %s failed", topic(row.id))
            await asyncio.to_thread(
                self.states.end,
                row.id,
                State.STATE_FAILED,
                training_job_pb2.JobError(
                    reason="LAUNCH_FAILED", message=f"{type(error).__name__}: {error}"
                ),
            )
            return
        launched = await asyncio.to_thread(self._launched, row.id, run)
        await self._follow(launched, run)

    def _mark_launching(
        self, job_id: str, token: str, devices: list[int]
    ) -> tuple[JobRow, str] | None:
        """Record, before the launch, that it is under way with this token: a restart in the
        middle repeats the same launch instead of starting a second run. Returns the row and
        the newest checkpoint to resume from (a job launched again after a lost run)."""
        with self.db.session() as session:
            row = store.get(session, job_id, for_update=True)
            repeat = row.launch.launching and row.state == "CANCELLING"
            if row.state != "QUEUED" and not repeat:
                return None
            row.launch = LaunchState(launching=True, token=token, devices=devices)
            row.token_sha256 = digest(token)
            latest = store.latest_checkpoint(session, job_id)
            session.flush()
            session.expunge(row)
            return row, latest.uri if latest is not None else ""

    def _launched(self, job_id: str, run: Run) -> JobRow:
        with self.db.session() as session:
            row = store.get(session, job_id, for_update=True)
            job = row.job()
            job.launcher_run_id = run.run_id
            row.launch = LaunchState(run=run.state, devices=row.launch.devices)
            row.store(job)
            self._note(session, job_id, f"launched on {self.launcher.name} as {run.run_id}")
            session.flush()
            session.expunge(row)
        self.signal.notify()
        return row

    async def _follow(self, row: JobRow, run: Run) -> None:
        """Bring a launched job up to date with its run: stop it if the job is being cancelled,
        record new log lines, then the run's state."""
        job_id = row.id
        if row.state == "CANCELLING" and not row.launch.cancel_sent:
            await asyncio.to_thread(self._note_cancel_sent, job_id)
            self.spawn(self.launcher.cancel(run))
        cursor = await asyncio.to_thread(self._cursor, job_id)
        lines, after = await self._logs(run, cursor)
        status = await self.launcher.status(run)
        if status.phase in (Phase.SUCCEEDED, Phase.FAILED, Phase.MISSING):
            more, after = await self._logs(run, after)  # what it printed last
            lines += more
        ended = status.phase in (Phase.SUCCEEDED, Phase.FAILED)
        if (
            ended
            and row.state in ("QUEUED", "RUNNING")
            and (status.output_adapter_version or status.output_request)
        ):
            # The worker left a result behind without reporting it: check it, or register it,
            # through AdapterService before the job ends.
            if job_id not in self._settling:
                task = asyncio.ensure_future(self._settle(job_id, row.name, status))
                self._settling[job_id] = task
            status = dataclasses.replace(status, phase=Phase.PENDING)
        await asyncio.to_thread(self._apply, job_id, lines, after, status)

    async def _settle(self, job_id: str, job_name: str, status: RunStatus) -> None:
        """End a job whose run ended without reporting its result: SUCCEEDED with the version
        the worker named if AdapterService has it as this job's, else with the version the
        stored registration request makes (idempotent: the job's request id), else FAILED.
        Retried with backoff while AdapterService is unavailable."""
        assert self.registry is not None
        delay = 1.0
        try:
            while True:
                try:
                    version = status.output_adapter_version
                    if version and not await self.registry.trained_by(version, job_name):
                        log.warning("%s: %s is not a version it trained", job_name, version)
                        version = ""
                    if not version and status.output_request:
                        version = await self.registry.register(status.output_request, job_name)
                        log.info("%s: registered its stored output as %s", job_name, version)
                    break
                except RegistryUnavailable as error:
                    log.warning(
                        "%s: the registry is unavailable (%s); again in %.0f s",
                        job_name,
                        error,
                        delay,
                    )
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, 30.0)
                except RegistrationRefused as error:
                    await asyncio.to_thread(
                        self.states.end,
                        job_id,
                        State.STATE_FAILED,
                        training_job_pb2.JobError(reason="REGISTRATION_FAILED", message=str(error)),
                    )
                    return
            if version:
                final = RunStatus(Phase.SUCCEEDED, output_adapter_version=version)
            elif status.phase == Phase.SUCCEEDED:
                final = RunStatus(
                    Phase.FAILED,
                    "RESULT_NOT_REGISTERED",
                    f"the worker named {status.output_adapter_version}, which the registry "
                    "does not have as a version this job trained",
                )
            else:
                final = status
            await asyncio.to_thread(self._apply, job_id, [], None, final)
        finally:
            self._settling.pop(job_id, None)

    async def _logs(self, run: Run, cursor: dict[str, Any]) -> tuple[list[LogLine], dict[str, Any]]:
        """New log lines of a run; none (and the same cursor) when they cannot be read now: the
        job's state must not wait for its logs."""
        try:
            return await self.launcher.logs(run, cursor)
        except Exception as error:
            log.warning("cannot read the logs of %s: %s", run.run_id, error)
            return [], cursor

    def _note_cancel_sent(self, job_id: str) -> None:
        with self.db.session() as session:
            row = store.get(session, job_id, for_update=True)
            row.launch = dataclasses.replace(row.launch, cancel_sent=True)

    def _cursor(self, job_id: str) -> dict[str, Any]:
        with self.db.read() as session:
            return store.get(session, job_id).launch.cursor

    def _apply(
        self,
        job_id: str,
        lines: list[LogLine],
        cursor: dict[str, Any] | None,
        status: RunStatus,
    ) -> None:
        with self.db.session() as session:
            row = store.get(session, job_id, for_update=True)
            job = row.job()
            if job.state in TERMINAL:
                # A job's final state change is its last event: a stream that has seen it has
                # seen everything (lines the run printed after its final report are dropped).
                lines = []
            for line in lines:
                message = training_job_pb2.TrainingEvent.LogLine(stream=line.stream, text=line.text)
                self.states.event(session, job_id, "log", message)
            launch = row.launch
            if cursor is not None:
                launch = dataclasses.replace(launch, cursor=cursor)
            if status.retries > launch.retries and job.state not in TERMINAL:
                launch = dataclasses.replace(launch, retries=status.retries)
                note = (
                    f"the run failed and is retried (retry {status.retries}): {status.message}; "
                    "the trainer resumes from its last checkpoint"
                )
                self._note(session, job_id, note)
            waiting = status.reason if status.phase == Phase.PENDING else ""
            if waiting != launch.waiting and job.state not in TERMINAL:
                # Why a launched run waits (the cluster's queue, no capacity), said once per
                # reason: a job waiting from its launch has no state change to say it with.
                launch = dataclasses.replace(launch, waiting=waiting)
                if waiting:
                    self._note(session, job_id, f"waiting ({waiting}): {status.message}")
            row.launch = launch
            if job.state not in TERMINAL:
                self._apply_phase(session, row, job, status)
            row.store(job)
        self.signal.notify()

    def _note(self, session: Session, job_id: str, text: str) -> None:
        """A line of the launcher's own on the job's event feed."""
        line = training_job_pb2.TrainingEvent.LogLine(stream="launcher", text=text)
        self.states.event(session, job_id, "log", line)

    def _apply_phase(
        self, session: Session, row: JobRow, job: TrainingJob, status: RunStatus
    ) -> None:
        cancelling = job.state == State.STATE_CANCELLING
        if status.phase == Phase.RUNNING:
            if job.state == State.STATE_QUEUED and job.HasField("start_time"):
                # Back from waiting: the silence clock starts again now.
                self.states.transition(
                    session,
                    row,
                    job,
                    State.STATE_RUNNING,
                    reason="RESUMED",
                    message="a Pod runs again; it resumes from the last checkpoint",
                )
                row.last_report_time = utcnow()
            elif job.state == State.STATE_QUEUED:
                self.states.transition(session, row, job, State.STATE_RUNNING)
                row.last_report_time = row.last_report_time or utcnow()
        elif status.phase == Phase.PENDING:
            if job.state == State.STATE_RUNNING:
                # Preempted, or its Pod lost and no capacity for another: it waits (QUEUED, so
                # the silence clock stops) instead of failing as a silent worker.
                self.states.transition(
                    session,
                    row,
                    job,
                    State.STATE_QUEUED,
                    reason=status.reason or "WAITING_FOR_CAPACITY",
                    message=status.message or "no Pod of the run is running",
                )
            return
        elif cancelling:
            self.states.transition(session, row, job, State.STATE_CANCELLED)
        elif status.phase == Phase.SUCCEEDED and status.output_adapter_version:
            job.output_adapter_version = status.output_adapter_version
            self.states.transition(session, row, job, State.STATE_SUCCEEDED)
        else:
            if status.phase == Phase.SUCCEEDED:
                reason, message = (
                    "NO_RESULT_REPORTED",
                    "the worker ended cleanly but never reported its result",
                )
            elif status.phase == Phase.FAILED:
                reason, message = status.reason, status.message
            else:
                reason = "RUN_LOST"
                message = f"the {self.launcher.name} launcher has no run {job.launcher_run_id}"
            error = training_job_pb2.JobError(reason=reason, message=message)
            self.states.transition(session, row, job, State.STATE_FAILED, error)

    async def _check_silence(self, row: JobRow) -> None:
        if row.id in self._settling:
            return  # the run has ended; its result is being registered
        # After a restart the clock starts again: the service could not hear reports while down.
        last = max(row.last_report_time or row.create_time, self.started_at)
        silent = (utcnow() - last).total_seconds()
        if silent <= self.training.worker_timeout_seconds:
            return
        error = training_job_pb2.JobError(
            reason="WORKER_SILENT",
            message=f"no report from the worker for {silent:.0f} s "
            f"(timeout {self.training.worker_timeout_seconds:g} s)",
        )
        if await asyncio.to_thread(self.states.end, row.id, State.STATE_FAILED, error):
            run = run_of(row)
            if run is not None:
                await self.launcher.cancel(run)

    def spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def datasets_of(job: TrainingJob) -> list[str]:
    return sorted({job.train_dataset, job.validation_dataset} - {""})
