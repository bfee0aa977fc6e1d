"""Worker reports: a worker's progress, checkpoints, evaluation and result, checked against
the token made for its run; checkpoints beyond those kept are forgotten and their stored copies
deleted."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from tunefleet.core.errors import InvalidArgument, PermissionDenied, Unauthenticated
from tunefleet.core.protos import timestamp
from tunefleet.runtime.settings import TrainingSettings
from tunefleet.runtime.streams import ChangeSignal
from tunefleet.storage.blobs import BlobStore, uri_sha256
from tunefleet.storage.database import Database, utcnow
from tunefleet.training import store
from tunefleet.training.launcher import JobLauncher, Run
from tunefleet.training.metrics import TrainingMetrics
from tunefleet.training.states import JobStates, run_of, topic
from tunefleet.training.store import TERMINAL, CheckpointRow, State
from tunefleet.v1 import training_job_pb2, training_service_pb2

log = logging.getLogger(__name__)

WorkerState = training_service_pb2.ReportTrainingProgressRequest.WorkerState


@dataclass(frozen=True)
class ReportOutcome:
    cancel_requested: bool
    run: Run | None  # the job's run, when the launcher must hear of the report
    checkpoint_uri: str = ""  # a checkpoint to resume retried runs from
    stop_run: bool = False  # the worker failed: stop its run (no retries)
    # Checkpoints no longer kept (their stored copies go) and those kept (which may share files).
    pruned: tuple[str, ...] = ()
    kept: tuple[str, ...] = ()


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class WorkerReports:
    def __init__(
        self,
        db: Database,
        blobs: BlobStore,
        training: TrainingSettings,
        states: JobStates,
        launcher: JobLauncher,
        metrics: TrainingMetrics,
        signal: ChangeSignal,
        spawn: Callable[[Coroutine[Any, Any, None]], None],
    ) -> None:
        self.db, self.blobs, self.training, self.states = db, blobs, training, states
        self.launcher, self.metrics, self.signal = launcher, metrics, signal
        self._spawn = spawn

    def _mirror(
        self, session: Session, job: str, progress: training_job_pb2.TrainingProgress
    ) -> None:
        """A progress report's figures, for the job's MLflow run at its step."""
        values = {
            "train_loss": progress.train_loss,
            "learning_rate": progress.learning_rate,
            "tokens_per_second": progress.tokens_per_second,
        }
        for optional in ("validation_loss", "reward_accuracy"):
            if progress.HasField(optional):
                values[optional] = getattr(progress, optional)
        step = progress.step
        self.states.after_commit(session, lambda: self.states.mirror.metrics(job, values, step))

    def report(
        self, request: training_service_pb2.ReportTrainingProgressRequest, token: str
    ) -> ReportOutcome:
        job_id = store.job_id(request.name)
        if not token:
            raise Unauthenticated(
                "a worker report needs its job's token (authorization: Bearer <token>)",
                reason="WORKER_TOKEN_MISSING",
            )
        with self.db.session() as session:
            row = store.get(session, job_id, for_update=True)
            if not row.token_sha256 or not hmac.compare_digest(digest(token), row.token_sha256):
                raise PermissionDenied(
                    f"the token is not the worker token of {request.name}",
                    reason="WORKER_TOKEN_MISMATCH",
                )
            job = row.job()
            if job.state in TERMINAL:
                return ReportOutcome(cancel_requested=True, run=None)
            now = utcnow()
            row.last_report_time = now
            if request.worker_state == WorkerState.WORKER_STATE_RUNNING:
                self.states.transition(session, row, job, State.STATE_RUNNING)
            if request.HasField("progress"):
                progress = request.progress
                if not progress.HasField("time"):
                    progress.time.CopyFrom(timestamp(now))
                job.latest_progress.CopyFrom(progress)
                self.states.event(session, job_id, "progress", progress)
                self.metrics.progress(job.name, progress)
                self._mirror(session, job.name, progress)
            checkpoint_uri = ""
            pruned: list[str] = []
            kept: list[str] = []
            if request.HasField("checkpoint"):
                checkpoint_uri = self._checkpoint(session, job_id, request.checkpoint, now)
                min_delta = job.hyperparameters.early_stopping_min_delta
                pruned, kept = self._prune_checkpoints(session, job_id, min_delta)
            if request.HasField("evaluation"):
                job.evaluation.CopyFrom(request.evaluation)
                self.states.event(session, job_id, "evaluation", request.evaluation)
                result = request.evaluation
                values = {
                    "final.validation_loss": result.validation_loss,
                    "final.base_validation_loss": result.base_validation_loss,
                }
                name = job.name
                self.states.after_commit(session, lambda: self.states.mirror.metrics(name, values))
            for line in request.log_lines:
                self.states.event(session, job_id, "log", line)
            stop_run = False
            if request.worker_state == WorkerState.WORKER_STATE_SUCCEEDED:
                job.output_adapter_version = request.output_adapter_version
                self.states.transition(session, row, job, State.STATE_SUCCEEDED)
            elif request.worker_state == WorkerState.WORKER_STATE_FAILED:
                error = training_job_pb2.JobError(
                    reason=request.error.reason or "TRAINER_FAILED",
                    message=request.error.message or "the trainer failed",
                )
                self.states.transition(session, row, job, State.STATE_FAILED, error)
                stop_run = True
            row.store(job)
            outcome = ReportOutcome(
                row.cancel_requested,
                run_of(row),
                checkpoint_uri,
                stop_run,
                tuple(pruned),
                tuple(kept),
            )
        self.signal.notify()
        return outcome

    def _checkpoint(
        self,
        session: Session,
        job_id: str,
        checkpoint: training_job_pb2.Checkpoint,
        now: datetime,
    ) -> str:
        if not checkpoint.uri or checkpoint.step <= 0:
            raise InvalidArgument("checkpoint", "needs a uri and a positive step")
        if session.get(CheckpointRow, (job_id, checkpoint.step)) is None:
            session.add(
                CheckpointRow(
                    job_id=job_id,
                    step=checkpoint.step,
                    uri=checkpoint.uri,
                    size_bytes=checkpoint.size_bytes,
                    validation_loss=checkpoint.validation_loss
                    if checkpoint.HasField("validation_loss")
                    else None,
                    create_time=now,
                )
            )
            session.flush()
            reported = training_job_pb2.Checkpoint()
            reported.CopyFrom(checkpoint)
            reported.name = f"{topic(job_id)}/checkpoints/{checkpoint.step}"
            reported.create_time.CopyFrom(timestamp(now))
            self.states.event(session, job_id, "checkpoint", reported)
        return checkpoint.uri

    def _prune_checkpoints(
        self, session: Session, job_id: str, min_delta: float
    ) -> tuple[list[str], list[str]]:
        """Forget all checkpoints of a job but the newest `keep_checkpoints` and the best, as the
        trainer does with its local copies. The best is the trainer's: the first validation loss,
        replaced by each one lower by more than the early stopping `min_delta` (with early
        stopping every such evaluation is checkpointed). Returns the URIs forgotten and kept."""
        rows = list(
            session.scalars(
                select(CheckpointRow)
                .where(CheckpointRow.job_id == job_id)
                .order_by(CheckpointRow.step)
            )
        )
        kept = rows[-self.training.keep_checkpoints :]
        best: CheckpointRow | None = None
        for row in rows:
            loss = row.validation_loss
            if loss is not None and (
                best is None
                or best.validation_loss is None
                or loss < best.validation_loss - min_delta
            ):
                best = row
        if best is not None:
            kept.append(best)
        pruned = [row for row in rows if row not in kept]
        for row in pruned:
            session.delete(row)
        session.flush()
        return [row.uri for row in pruned], [row.uri for row in kept]

    def _delete_checkpoint_blobs(self, pruned: tuple[str, ...], kept: tuple[str, ...]) -> None:
        """Delete the stored copies of checkpoints no longer kept: each one's manifest and the
        files it names, except files a kept checkpoint names too."""
        keep = set().union(*(_checkpoint_blobs(self.blobs, uri) for uri in kept))
        for uri in pruned:
            for sha256 in _checkpoint_blobs(self.blobs, uri) - keep:
                try:
                    self.blobs.delete(sha256)
                except Exception as error:  # a blob already gone, a store hiccup: not fatal
                    log.warning("cannot delete checkpoint blob %s: %s", sha256, error)

    async def after_report(self, outcome: ReportOutcome) -> None:
        """What the launcher must do after a report: keep a checkpoint for retries, or stop the
        run of a worker that failed; and delete the stored checkpoints no longer kept."""
        if outcome.pruned:
            await asyncio.to_thread(self._delete_checkpoint_blobs, outcome.pruned, outcome.kept)
        if outcome.run is None:
            return
        if outcome.checkpoint_uri:
            await self.launcher.checkpoint_saved(outcome.run, outcome.checkpoint_uri)
        if outcome.stop_run:
            self._spawn(self.launcher.cancel(outcome.run))


def _checkpoint_blobs(blobs: BlobStore, uri: str) -> set[str]:
    """The blobs of a stored checkpoint (its manifest and files); none for a local one."""
    sha256 = uri_sha256(uri)
    if sha256 is None or uri != blobs.uri(sha256):
        return set()
    try:
        manifest = json.loads(blobs.read_bytes(sha256))
        files = {str(sha) for sha in manifest["files"].values()}
    except Exception as error:  # gone already, or not a checkpoint manifest
        log.warning("cannot read checkpoint manifest %s: %s", uri, error)
        return set()
    return {sha256, *files}
