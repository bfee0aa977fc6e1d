"""Prometheus metrics of the adapter registry."""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge


class AdapterMetrics:
    def __init__(self, registry: CollectorRegistry, watchers: Callable[[], int]) -> None:
        self.versions = Counter(
            "tunefleet_adapter_versions_registered",
            "Adapter versions registered, by kind (adapter or full_model).",
            ["kind"],
            registry=registry,
        )
        self.refusals = Counter(
            "tunefleet_adapter_validation_failures",
            "Versions refused at registration, by reason.",
            ["reason"],
            registry=registry,
        )
        self.alias_moves = Counter(
            "tunefleet_adapter_alias_moves", "Aliases created, moved or deleted.", registry=registry
        )
        self.bytes = Counter(
            "tunefleet_adapter_stored_bytes",
            "Bytes of version files registered.",
            registry=registry,
        )
        self.watchers = Gauge(
            "tunefleet_adapter_watchers", "Watch streams waiting for changes.", registry=registry
        )
        self.watchers.set_function(watchers)
