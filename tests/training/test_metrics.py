"""TrainingService's per-job gauges follow the latest progress and go when the job ends."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from tunefleet.training.metrics import TrainingMetrics
from tunefleet.v1 import training_job_pb2


def test_dpo_reward_accuracy_is_exported_while_the_job_runs() -> None:
    registry = CollectorRegistry()
    metrics = TrainingMetrics(registry)
    job = "trainingJobs/abc"
    metrics.progress(job, training_job_pb2.TrainingProgress(step=3, train_loss=0.5))
    # Not a DPO job, or no evaluation yet: no series.
    assert registry.get_sample_value("tunefleet_training_reward_accuracy", {"job": job}) is None
    metrics.progress(job, training_job_pb2.TrainingProgress(step=4, reward_accuracy=0.75))
    assert registry.get_sample_value("tunefleet_training_reward_accuracy", {"job": job}) == 0.75
    metrics.ended(job, "succeeded", 10.0)
    assert registry.get_sample_value("tunefleet_training_reward_accuracy", {"job": job}) is None


def test_every_ending_is_counted_from_zero_those_that_never_started_included() -> None:
    registry = CollectorRegistry()
    metrics = TrainingMetrics(registry)
    ended = "tunefleet_training_jobs_ended_total"
    for state in ("succeeded", "failed", "cancelled"):
        assert registry.get_sample_value(ended, {"state": state}) == 0
    metrics.ended("trainingJobs/a", "failed", None)  # failed before it started: no duration
    assert registry.get_sample_value(ended, {"state": "failed"}) == 1
    count = "tunefleet_training_job_duration_seconds_count"
    assert registry.get_sample_value(count, {"state": "failed"}) == 0
