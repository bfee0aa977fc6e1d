"""Prometheus metrics of training jobs."""

from __future__ import annotations

import contextlib

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from tunefleet.v1 import training_job_pb2

STATES = [
    name.removeprefix("STATE_").lower()
    for name in training_job_pb2.TrainingJob.State.keys()  # noqa: SIM118
    if name != "STATE_UNSPECIFIED"
]
ENDED = ["succeeded", "failed", "cancelled"]
HOURS = (60, 300, 900, 1800, 3600, 2 * 3600, 4 * 3600, 8 * 3600, 24 * 3600, 72 * 3600)


class TrainingMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.jobs = Gauge(
            "tunefleet_training_jobs", "Training jobs by state.", ["state"], registry=registry
        )
        self.leader = Gauge(
            "tunefleet_training_leader",
            "1 on the TrainingService replica whose scheduler runs (the leader), 0 on the others.",
            registry=registry,
        )
        self.queue_depth = Gauge(
            "tunefleet_training_queue_depth",
            "Jobs waiting to be launched.",
            registry=registry,
        )
        self.ended_jobs = Counter(
            "tunefleet_training_jobs_ended",
            "Training jobs that ended, by final state (those that never started included).",
            ["state"],
            registry=registry,
        )
        self.duration = Histogram(
            "tunefleet_training_job_duration_seconds",
            "Time from a job's start to its end, by final state (jobs that started).",
            ["state"],
            buckets=HOURS,
            registry=registry,
        )
        self.queue_time = Histogram(
            "tunefleet_training_queue_seconds",
            "Time from a job's creation to its start.",
            buckets=(1, 5, 15, 60, *HOURS),
            registry=registry,
        )
        self.train_loss = Gauge(
            "tunefleet_training_train_loss",
            "Latest training loss of each running job.",
            ["job"],
            registry=registry,
        )
        self.validation_loss = Gauge(
            "tunefleet_training_validation_loss",
            "Latest validation loss of each running job.",
            ["job"],
            registry=registry,
        )
        self.reward_accuracy = Gauge(
            "tunefleet_training_reward_accuracy",
            "Latest validation reward accuracy of each running DPO job.",
            ["job"],
            registry=registry,
        )
        self.tokens_per_second = Gauge(
            "tunefleet_training_tokens_per_second",
            "Latest training throughput of each running job (non-padding tokens per second).",
            ["job"],
            registry=registry,
        )
        for state in STATES:
            self.jobs.labels(state)
        # At zero from the start: a series that appears at 1 hides the first failure after a
        # restart from increase() (TunefleetTrainingJobsFailing).
        for state in ENDED:
            self.ended_jobs.labels(state)
            self.duration.labels(state)

    def progress(self, job: str, progress: training_job_pb2.TrainingProgress) -> None:
        if progress.HasField("train_loss"):
            self.train_loss.labels(job).set(progress.train_loss)
        if progress.HasField("validation_loss"):
            self.validation_loss.labels(job).set(progress.validation_loss)
        if progress.HasField("reward_accuracy"):
            self.reward_accuracy.labels(job).set(progress.reward_accuracy)
        self.tokens_per_second.labels(job).set(progress.tokens_per_second)

    def ended(self, job: str, state: str, seconds: float | None) -> None:
        self.ended_jobs.labels(state).inc()
        if seconds is not None:
            self.duration.labels(state).observe(seconds)
        gauges = (
            self.train_loss,
            self.validation_loss,
            self.reward_accuracy,
            self.tokens_per_second,
        )
        for gauge in gauges:
            with contextlib.suppress(KeyError):
                gauge.remove(job)

    def follower(self) -> None:
        """No longer the leader: the job counts are the leader's to export (the series go, so
        a sum over replicas counts each job once)."""
        self.leader.set(0)
        self.jobs.clear()
        self.queue_depth.set(0)

    def counts(self, by_state: dict[str, int], queued_unlaunched: int) -> None:
        for state in STATES:
            self.jobs.labels(state).set(by_state.get(state.upper(), 0))
        self.queue_depth.set(queued_unlaunched)
