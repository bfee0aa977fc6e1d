"""Progress reports: JSON lines in the output directory always, and TrainingService's progress
RPC when the spec names an endpoint."""

from __future__ import annotations

import collections
import json
import logging
import threading
import time
from pathlib import Path
from typing import Any

from tunefleet.trainer.spec import ReportSpec

log = logging.getLogger(__name__)
EVALUATION_FIELDS = {
    "base_validation_loss",
    "validation_loss",
    "base_perplexity",
    "perplexity",
    "base_task_metrics",
    "task_metrics",
    "adapter_changes_logits",
    "reward_accuracy",
    "reward_margin",
}


class Cancelled(Exception):
    """TrainingService asked the worker to stop."""


class Reporter:
    """Writes events to `path` and sends them to TrainingService (when `remote` names it).
    Without a path (processes other than the first of a distributed run) it reports nothing."""

    def __init__(self, path: Path | None, remote: ReportSpec) -> None:
        self._file = None
        self._remote = None
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._file = path.open("a", buffering=1)
            self._remote = _RemoteReporter(remote) if remote.endpoint else None

    @property
    def cancel_requested(self) -> bool:
        return self._remote is not None and self._remote.cancel_requested

    def event(self, kind: str, **fields: Any) -> None:
        if self._file is None:
            return
        entry = {"event": kind, "time": time.time(), **fields}
        self._file.write(json.dumps(entry) + "\n")
        if self._remote is not None:
            self._remote.send(kind, fields)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        if self._remote is not None:
            self._remote.close()


# Answers that refuse the report itself: it would be refused again.
REFUSED = {
    "INVALID_ARGUMENT", "NOT_FOUND", "ALREADY_EXISTS", "PERMISSION_DENIED", "UNAUTHENTICATED",
    "FAILED_PRECONDITION", "OUT_OF_RANGE", "UNIMPLEMENTED",
}  # fmt: skip
FAULTS = {"INTERNAL", "UNKNOWN", "DATA_LOSS"}  # the service's own errors: tried a few times


class _RemoteReporter:
    """Sends events to TrainingService.ReportTrainingProgress with the job's worker token, and a
    heartbeat (a report with no news) whenever nothing was sent for `heartbeat_seconds`.

    One sender thread delivers reports in order. While the service answers, `send` waits for
    its report (so a cancellation is seen at the next step); while it does not (a restart, a
    rolling update), training goes on and reports queue up, each retried until the service is
    back: a checkpoint report is never dropped, or a retried run would resume from an older
    checkpoint. `close` waits a bounded time for the queue to drain (the final report).
    """

    QUEUE_LIMIT = 10_000  # beyond it the oldest progress-only reports are dropped
    FAULT_TRIES = 5  # INTERNAL or UNKNOWN answers to one report before it is given up
    CALL_SECONDS = 10.0
    DRAIN_SECONDS = 60.0

    def __init__(self, spec: ReportSpec) -> None:
        import grpc

        from tunefleet.trainer.register import RECONNECT_OPTIONS
        from tunefleet.v1 import training_service_pb2_grpc

        self.spec = spec
        self.channel = grpc.insecure_channel(spec.endpoint, options=RECONNECT_OPTIONS)
        self.stub = training_service_pb2_grpc.TrainingServiceStub(self.channel)
        self.cancel_requested = False
        self.healthy = True  # the last call reached the service
        self._queue: collections.deque[_Pending] = collections.deque()
        self._changed = threading.Condition()
        self._stopping = False
        self._last_sent = time.monotonic()
        self._faults = 0  # INTERNAL or UNKNOWN answers in a row
        self._sender = threading.Thread(target=self._send_loop, name="reports", daemon=True)
        self._sender.start()

    def _send_loop(self) -> None:
        from tunefleet.v1 import training_service_pb2

        interval = self.spec.heartbeat_seconds
        while True:
            with self._changed:
                while not self._queue and not self._stopping:
                    idle = time.monotonic() - self._last_sent
                    if idle >= interval:
                        heartbeat = training_service_pb2.ReportTrainingProgressRequest(
                            name=self.spec.job
                        )
                        self._queue.append(_Pending(heartbeat))
                        break
                    self._changed.wait(interval - idle)
                if not self._queue:
                    return  # stopping, and everything was delivered
                pending = self._queue[0]
            delivered = self._call(pending.request)
            with self._changed:
                if delivered or self._stopping:
                    if self._queue and self._queue[0] is pending:  # close() may have cleared it
                        self._queue.popleft()
                    pending.done.set()
                    self._changed.notify_all()

    def _call(self, request: Any) -> bool:
        """Deliver one report; False when it should be tried again (the service is away)."""
        import grpc

        self._last_sent = time.monotonic()
        try:
            response = self.stub.ReportTrainingProgress(
                request,
                timeout=self.CALL_SECONDS,
                wait_for_ready=True,
                metadata=(("authorization", f"Bearer {self.spec.token}"),)
                if self.spec.token
                else (),
            )
        except grpc.RpcError as error:
            code = error.code()
            # Refusals of the report itself are final; anything else is the service's state
            # (away, stopping: a call cut by a shutdown ends CANCELLED or INTERNAL) and the
            # report waits for it. A service that fails the same report on and on gives up
            # on it after FAULT_TRIES, so one bad report cannot hold the queue for ever.
            if code.name not in REFUSED:
                self._faults = self._faults + 1 if code.name in FAULTS else 0
                if self._faults < self.FAULT_TRIES:
                    if self.healthy:
                        log.warning(
                            "progress reports wait for TrainingService (%s): %s",
                            code.name,
                            error.details(),
                        )
                    self.healthy = False
                    time.sleep(0.5)
                    return False
            self._faults = 0
            log.warning("a progress report was refused (%s): %s", code, error.details())
            return True
        self._faults = 0
        if not self.healthy:
            log.info("TrainingService answers again; sending the reports it missed")
        self.healthy = True
        self.cancel_requested |= bool(response.cancel_requested)
        return True

    def _enqueue(self, request: Any) -> _Pending:
        pending = _Pending(request)
        with self._changed:
            if len(self._queue) >= self.QUEUE_LIMIT:
                for queued in list(self._queue)[1:]:
                    if queued.progress_only:
                        self._queue.remove(queued)
                        queued.done.set()
                        break
            self._queue.append(pending)
            self._changed.notify_all()
        return pending

    def close(self) -> None:
        """Deliver what is queued (waiting at most DRAIN_SECONDS), then stop."""
        with self._changed:
            deadline = time.monotonic() + self.DRAIN_SECONDS
            while self._queue and time.monotonic() < deadline:
                self._changed.wait(deadline - time.monotonic())
            if self._queue:
                log.warning("%d progress reports were never delivered", len(self._queue))
            self._stopping = True
            self._queue.clear()
            self._changed.notify_all()
        self._sender.join(timeout=self.CALL_SECONDS + 5)
        self.channel.close()

    def send(self, kind: str, fields: dict[str, Any]) -> bool:
        from google.protobuf import duration_pb2

        from tunefleet.v1 import training_job_pb2, training_service_pb2

        request = training_service_pb2.ReportTrainingProgressRequest(name=self.spec.job)
        states = training_service_pb2.ReportTrainingProgressRequest
        if kind == "progress":
            progress = training_job_pb2.TrainingProgress(
                step=fields["step"],
                total_steps=fields["total_steps"],
                epoch=fields["epoch"],
                learning_rate=fields["learning_rate"],
                grad_norm=fields.get("grad_norm", 0.0),
                tokens_per_second=fields.get("tokens_per_second", 0.0),
                eta=duration_pb2.Duration(seconds=int(fields.get("eta_seconds", 0))),
            )
            if fields.get("train_loss") is not None:
                progress.train_loss = fields["train_loss"]
            for name in ("validation_loss", "reward_accuracy", "reward_margin"):
                if fields.get(name) is not None:
                    setattr(progress, name, fields[name])
            request.progress.CopyFrom(progress)
        elif kind == "started":
            request.worker_state = states.WORKER_STATE_RUNNING
        elif kind == "finished":
            request.worker_state = states.WORKER_STATE_SUCCEEDED
            request.output_adapter_version = fields.get("adapter_version", "")
            evaluation = fields.get("evaluation") or {}
            request.evaluation.CopyFrom(
                training_job_pb2.EvaluationResult(
                    **{
                        key: value
                        for key, value in evaluation.items()
                        if value is not None and key in EVALUATION_FIELDS
                    }
                )
            )
        elif kind == "failed":
            request.worker_state = states.WORKER_STATE_FAILED
            request.error.reason = fields.get("reason", "TRAINER_FAILED")
            request.error.message = fields.get("message", "")
        elif kind == "checkpoint":
            request.checkpoint.step = fields["step"]
            request.checkpoint.uri = fields["uri"]
            request.checkpoint.size_bytes = fields.get("size_bytes", 0)
            if fields.get("validation_loss") is not None:
                request.checkpoint.validation_loss = fields["validation_loss"]
        else:
            return self.cancel_requested
        pending = self._enqueue(request)
        if self.healthy:
            pending.done.wait(self.CALL_SECONDS + 5)
        return self.cancel_requested


class _Pending:
    """A report waiting to be delivered."""

    def __init__(self, request: Any) -> None:
        self.request = request
        self.done = threading.Event()
        self.progress_only = request.HasField("progress") and not (
            request.worker_state or request.HasField("checkpoint")
        )
