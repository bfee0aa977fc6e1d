"""Experiment records: training runs and evaluation jobs mirrored to MLflow when
`mlflow.tracking_uri` is set, for teams that compare runs there.

Each job is one MLflow run in the experiment `mlflow.experiment`, found again by its tag
`tunefleet.job` (a restarted service appends to the same run): training jobs log their settings
as parameters, every progress report as metrics at its step, and the registered adapter version
as the tag `tunefleet.adapter_version`; evaluation jobs log their setup as parameters, each
candidate's scores as metrics (`{candidate}.{grader}.mean`, `.ci_low`, `.ci_high`, and against
the baseline `.difference` and `.p_value`), and the versions they judged as tags.

The mirror never stands in a job's way: records are queued (up to 10,000) and written by one
thread in order with MLflow's own client; a write that fails is retried with backoff and then
logged and dropped (the client's own HTTP retries come first: MLFLOW_HTTP_REQUEST_MAX_RETRIES and
MLFLOW_HTTP_REQUEST_TIMEOUT bound them). The platform's own stores stay the source of truth.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import Message

from tunefleet.runtime.settings import MlflowSettings

log = logging.getLogger(__name__)
_STOP = object()
STATUS = {"succeeded": "FINISHED", "failed": "FAILED", "cancelled": "KILLED"}
QUEUED = 10_000  # records waiting for a server that is away; more are dropped


def flatten(message: Message, limit: int = 500) -> dict[str, str]:
    """A message's fields as MLflow parameters: dotted names, values as text (cut at `limit`)."""
    out: dict[str, str] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                walk(f"{prefix}.{key}" if prefix else key, inner)
        else:
            text = value if isinstance(value, str) else str(value)
            out[prefix] = text[:limit]

    walk("", json_format.MessageToDict(message, preserving_proto_field_name=True))
    return out


class ExperimentMirror:
    """Writes runs to MLflow from a thread of its own; a no-op without a tracking URI."""

    def __init__(self, settings: MlflowSettings) -> None:
        self.settings = settings
        self._queue: queue.Queue[Any] = queue.Queue(QUEUED)
        self._thread: threading.Thread | None = None
        self._client: Any = None
        self._experiment = ""
        self._runs: dict[str, str] = {}  # job name -> run id

    @property
    def enabled(self) -> bool:
        return bool(self.settings.tracking_uri)

    def start(self) -> None:
        if self.enabled and self._thread is None:
            self._thread = threading.Thread(target=self._work, name="mlflow-mirror", daemon=True)
            self._thread.start()

    def stop(self, wait_seconds: float = 10.0) -> None:
        """Write what is queued (for at most `wait_seconds`), then stop."""
        if self._thread is not None:
            self._queue.put(_STOP)  # waits for room: the writer is draining
            self._thread.join(wait_seconds)
            self._thread = None

    # --- what services record -----------------------------------------------------------------

    def run(self, job: str, params: Mapping[str, str], tags: Mapping[str, str]) -> None:
        """Open (or find again) the job's run, with its parameters and tags."""
        self._submit(lambda: self._open(job, params, tags))

    def metrics(self, job: str, values: Mapping[str, float], step: int = 0) -> None:
        values = dict(values)
        self._submit(lambda: self._log(job, values, step))

    def end(self, job: str, state: str, tags: Mapping[str, str]) -> None:
        """Close the run: `state` is the job's final state (`succeeded`, `failed`, ...)."""
        tags = dict(tags)
        self._submit(lambda: self._close(job, STATUS.get(state, "FAILED"), tags))

    # --- the writer ---------------------------------------------------------------------------

    def _submit(self, write: Callable[[], None]) -> None:
        if not self.enabled:
            return
        try:
            self._queue.put_nowait(write)
        except queue.Full:
            log.warning("MLflow record dropped: %d records already wait for the server", QUEUED)

    def _work(self) -> None:
        while (write := self._queue.get()) is not _STOP:
            for attempt in range(self.settings.attempts):
                try:
                    write()
                    break
                except Exception as error:
                    if attempt == self.settings.attempts - 1:
                        log.warning("MLflow record dropped after %d tries: %s", attempt + 1, error)
                    else:
                        time.sleep(min(10.0, 0.5 * 2**attempt))

    def _mlflow(self) -> Any:
        if self._client is None:
            from mlflow.tracking import MlflowClient

            client = MlflowClient(tracking_uri=self.settings.tracking_uri)
            found = client.get_experiment_by_name(self.settings.experiment)
            self._experiment = (
                found.experiment_id if found else client.create_experiment(self.settings.experiment)
            )
            self._client = client
        return self._client

    def _run_id(self, job: str) -> str:
        if job not in self._runs:
            client = self._mlflow()
            found = client.search_runs(
                [self._experiment], filter_string=f"tags.`tunefleet.job` = '{job}'", max_results=1
            )
            if found:
                self._runs[job] = found[0].info.run_id
            else:
                run = client.create_run(self._experiment, run_name=job, tags={"tunefleet.job": job})
                self._runs[job] = run.info.run_id
        return self._runs[job]

    def _open(self, job: str, params: Mapping[str, str], tags: Mapping[str, str]) -> None:
        from mlflow.entities import Param, RunTag

        run = self._run_id(job)
        logged = self._mlflow().get_run(run).data.params
        fresh = [Param(k, v) for k, v in params.items() if k not in logged]
        self._mlflow().log_batch(run, params=fresh, tags=[RunTag(k, v) for k, v in tags.items()])

    def _log(self, job: str, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = [Metric(key, float(value), now, step) for key, value in values.items()]
        self._mlflow().log_batch(self._run_id(job), metrics=metrics)

    def _close(self, job: str, status: str, tags: Mapping[str, str]) -> None:
        from mlflow.entities import RunTag

        run = self._run_id(job)
        if tags:
            self._mlflow().log_batch(run, tags=[RunTag(k, v) for k, v in tags.items()])
        self._mlflow().set_terminated(run, status)
