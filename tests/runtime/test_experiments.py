"""Experiment records in MLflow: a real tracking server started here (PyPI `mlflow`), a training
job and an evaluation job run on the embedded platform, and their runs read back with MLflow's
own client. A server that is down never holds a job up."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.evaluation.test_service import create, job, wait
from tests.helpers import free_port
from tests.training.conftest import big_model, chat_model, make_platform, platform_settings
from tunefleet.runtime.experiments import ExperimentMirror
from tunefleet.runtime.settings import MlflowSettings
from tunefleet.v1 import evaluation_pb2, training_job_pb2

__all__ = ["big_model", "chat_model", "make_platform", "platform_settings"]
pytestmark = pytest.mark.timeout(600)
MLFLOW = Path(sys.executable).with_name("mlflow")


@pytest.fixture
def tracking_server(tmp_path: Path) -> Iterator[str]:
    port = free_port()
    server = subprocess.Popen(
        [
            str(MLFLOW), "server",
            "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--default-artifact-root", str(tmp_path / "artifacts"),
            "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # its workers go with it
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{uri}/health", timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                assert server.poll() is None, "the MLflow server exited"
                assert time.monotonic() < deadline, "the MLflow server did not start"
                time.sleep(0.2)
        yield uri
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(30)


def finished_runs(uri: str, experiment: str, count: int) -> list[Any]:
    """The experiment's runs once `count` of them have ended (the mirror writes in the
    background)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    deadline = time.monotonic() + 60
    while True:
        found = client.get_experiment_by_name(experiment)
        runs = client.search_runs([found.experiment_id]) if found else []
        if sum(run.info.status == "FINISHED" for run in runs) >= count:
            return list(runs)
        assert time.monotonic() < deadline, [(r.info.run_name, r.info.status) for r in runs]
        time.sleep(0.2)


async def test_training_runs_and_evaluations_are_recorded_in_mlflow(
    make_platform: Any, tracking_server: str
) -> None:
    from mlflow.tracking import MlflowClient

    platform = await make_platform(
        inference={"base_model": "colours"},
        mlflow={"tracking_uri": tracking_server, "experiment": "tests"},
    )
    dataset = await platform.upload()
    trained = await platform.create(dataset.name)
    trained = await platform.wait(trained.name, "SUCCEEDED", "FAILED", within=300)
    assert trained.state == training_job_pb2.TrainingJob.State.STATE_SUCCEEDED, trained.error
    candidates = [
        evaluation_pb2.EvaluationCandidate(name="base"),
        evaluation_pb2.EvaluationCandidate(name="tuned", adapter=trained.output_adapter_version),
    ]
    evaluated = await create(platform, job(dataset.name, *candidates, max_items=4))
    evaluated = await wait(
        platform, evaluated.name, evaluation_pb2.EvaluationJob.State.STATE_SUCCEEDED
    )

    runs = {run.info.run_name: run for run in finished_runs(tracking_server, "tests", 2)}
    client = MlflowClient(tracking_uri=tracking_server)
    training = runs[trained.name]
    assert training.data.tags["tunefleet.kind"] == "training"
    assert training.data.tags["tunefleet.adapter_version"] == trained.output_adapter_version
    assert training.data.params["base_model"] == "colours"
    assert training.data.params["hyperparameters.max_steps"] == "6"
    assert training.data.params["lora.rank"] == "8"
    losses = client.get_metric_history(training.info.run_id, "train_loss")
    assert sorted(m.step for m in losses) == list(range(1, trained.latest_progress.step + 1))
    assert losses[-1].value == pytest.approx(trained.latest_progress.train_loss)
    assert [m.step for m in client.get_metric_history(training.info.run_id, "validation_loss")]
    assert training.data.metrics["final.validation_loss"] == pytest.approx(
        trained.evaluation.validation_loss
    )

    evaluation = runs[evaluated.name]
    assert evaluation.data.tags["tunefleet.kind"] == "evaluation"
    assert evaluation.data.tags["tunefleet.adapter_version.tuned"] == trained.output_adapter_version
    assert evaluation.data.params["dataset"] == dataset.name
    assert evaluation.data.params["graders"]  # the graders, as the job gave them
    tuned = next(r for r in evaluated.results if r.candidate == "tuned")
    for score in tuned.scores:
        key = f"tuned.{score.grader}"
        assert evaluation.data.metrics[f"{key}.mean"] == pytest.approx(score.mean)
        assert evaluation.data.metrics[f"{key}.ci_high"] == pytest.approx(score.ci_high)
        assert evaluation.data.metrics[f"{key}.p_value"] == pytest.approx(score.comparison.p_value)


def test_a_tracking_server_that_is_down_costs_nothing_but_the_record(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the client's own retries
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    mirror = ExperimentMirror(
        MlflowSettings(tracking_uri=f"http://127.0.0.1:{free_port()}", attempts=2)
    )
    mirror.start()
    started = time.monotonic()
    mirror.run("trainingJobs/x", {"a": "1"}, {})
    mirror.metrics("trainingJobs/x", {"loss": 1.0}, step=1)
    submitted = time.monotonic() - started
    mirror.stop(wait_seconds=120)
    assert submitted < 5  # queued, not written, by the caller
    assert "MLflow record dropped after 2 tries" in caplog.text
