"""Prometheus metrics of the retraining loop: what waits to be trained on, how runs end, and the
moves of the champion alias they make."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from tunefleet.v1 import retraining_pb2

Run = retraining_pb2.RetrainingRun
# How a run ends: the outcome of a succeeded run, or the state it ended in.
OUTCOMES = [
    *(
        name.removeprefix("OUTCOME_").lower()
        for name in Run.Outcome.keys()  # noqa: SIM118
        if name != "OUTCOME_UNSPECIFIED"
    ),
    "failed",
    "cancelled",
]


class RetrainingMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.pending = Gauge(
            "tunefleet_retraining_pending_examples",
            "New training examples waiting in a policy's feedback (read at each trigger check).",
            ["policy", "adapter"],
            registry=registry,
        )
        self.min_examples = Gauge(
            "tunefleet_retraining_min_new_examples",
            "The examples a policy's run needs (its data.min_new_examples).",
            ["policy", "adapter"],
            registry=registry,
        )
        self.runs = Counter(
            "tunefleet_retraining_runs_ended",
            "Retraining runs that ended, by outcome (promoted, gate_failed, rejected, "
            "champion_moved, not_enough_data, failed, cancelled).",
            ["policy", "adapter", "outcome"],
            registry=registry,
        )
        self.in_progress = Gauge(
            "tunefleet_retraining_runs_in_progress",
            "Retraining runs in progress (awaiting approval included).",
            registry=registry,
        )
        self.rollbacks = Counter(
            "tunefleet_retraining_rollbacks",
            "Canaries the rollback rule ended (the challenger rated worse than the champion).",
            ["adapter"],
            registry=registry,
        )
        self.promotions = Counter(
            "tunefleet_retraining_promotions",
            "Champion alias moves made by retraining runs.",
            ["adapter"],
            registry=registry,
        )

    def policy(self, policy: str, adapter: str) -> None:
        """A policy's counters at zero, from when the process knows it (at start or when it is
        created): a series that appears at 1 would hide its first run's end from increase()."""
        for outcome in OUTCOMES:
            self.runs.labels(policy, adapter, outcome)
        self.promotions.labels(adapter)
        self.rollbacks.labels(adapter)
