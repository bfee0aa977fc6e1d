"""Progress reports: JSON lines in the output directory always, and TrainingService's progress
RPC when the spec names an endpoint."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from tunefleet.trainer.spec import ReportSpec

log = logging.getLogger(__name__)


class Reporter:
    def __init__(self, path: Path, remote: ReportSpec) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = path.open("a", buffering=1)
        self._remote = _RemoteReporter(remote) if remote.endpoint else None
        self.cancel_requested = False

    def event(self, kind: str, **fields: Any) -> None:
        entry = {"event": kind, "time": time.time(), **fields}
        self._file.write(json.dumps(entry) + "\n")
        if self._remote is not None:
            self.cancel_requested |= self._remote.send(kind, fields)

    def close(self) -> None:
        self._file.close()


class _RemoteReporter:
    """Sends events to TrainingService.ReportTrainingProgress with the job's worker token.
    A report that fails is logged and training goes on; the service notices silence itself."""

    def __init__(self, spec: ReportSpec) -> None:
        import grpc

        from tunefleet.v1 import training_service_pb2_grpc

        self.spec = spec
        self.channel = grpc.insecure_channel(spec.endpoint)
        self.stub = training_service_pb2_grpc.TrainingServiceStub(self.channel)

    def send(self, kind: str, fields: dict[str, Any]) -> bool:
        import grpc
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
        elif kind == "failed":
            request.worker_state = states.WORKER_STATE_FAILED
            request.error.reason = fields.get("reason", "TRAINER_FAILED")
            request.error.message = fields.get("message", "")
        elif kind == "checkpoint":
            request.checkpoint.step = fields["step"]
            request.checkpoint.uri = fields["uri"]
        else:
            return False
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
