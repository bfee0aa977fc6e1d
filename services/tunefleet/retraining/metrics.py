"""Prometheus metrics of the retraining loop: what waits to be trained on, how runs end, and the
moves of the champion alias they make."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


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
