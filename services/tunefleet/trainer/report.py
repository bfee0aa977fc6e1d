"""Progress reports: JSON lines in the output directory always, and TrainingService's progress
RPC when the spec names an endpoint."""

from __future__ import annotations

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


class _RemoteReporter:
    """Sends events to TrainingService.ReportTrainingProgress with the job's worker token, and a
    heartbeat (a report with no news) whenever nothing was sent for `heartbeat_seconds`.
    A report that fails is logged and training goes on; the service notices silence itself."""

    def __init__(self, spec: ReportSpec) -> None:
        import grpc

        from tunefleet.v1 import training_service_pb2_grpc

        self.spec = spec
        self.channel = grpc.insecure_channel(spec.endpoint)
        self.stub = training_service_pb2_grpc.TrainingServiceStub(self.channel)
        self.cancel_requested = False
        self._last_sent = time.monotonic()
        self._stopped = threading.Event()
        self._heartbeat = threading.Thread(target=self._beat, name="heartbeat", daemon=True)
        self._heartbeat.start()

    def _beat(self) -> None:
        from tunefleet.v1 import training_service_pb2

        interval = self.spec.heartbeat_seconds
        while not self._stopped.wait(max(0.05, self._last_sent + interval - time.monotonic())):
            if time.monotonic() - self._last_sent >= interval:
                request = training_service_pb2.ReportTrainingProgressRequest(name=self.spec.job)
                self.cancel_requested |= self._call(request)

    def close(self) -> None:
        self._stopped.set()
        self._heartbeat.join(timeout=5)
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
            if fields.get("validation_loss") is not None:
                progress.validation_loss = fields["validation_loss"]
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
        self.cancel_requested |= self._call(request)
        return self.cancel_requested

    def _call(self, request: Any) -> bool:
        import grpc

        self._last_sent = time.monotonic()
        try:
            response = self.stub.ReportTrainingProgress(
                request,
                timeout=10,
                metadata=(("authorization", f"Bearer {self.spec.token}"),)
                if self.spec.token
                else (),
            )
        except grpc.RpcError as error:
            log.warning("progress report failed: %s", error.details())
            return False
        return bool(response.cancel_requested)
