"""Prometheus metrics of serving, by adapter and version (vLLM's own metrics know only the base
model)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Summary
from prometheus_client.core import GaugeMetricFamily

# Every outcome of a request, and every rating sign and `corrected` of feedback: the series of
# a version exist, at zero, from when the process first meets the version (`version_seen`).
OUTCOMES = ("ok", "cancelled", "invalid", "error")
RATINGS = ("negative", "neutral", "positive")
LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
PER_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)


# The metric labels of a request that never reached a version (bad input, unknown adapter):
# not the name it sent, which would let any client create series. Refusals of a version that
# exists (not servable, not loaded, no room) carry its name and are counted under it.
UNRESOLVED = ("unresolved", "")


def version_labels(version: str) -> tuple[str, str]:
    """The (adapter, version) labels of a version name; ("base", "") for the base model."""
    return (version.split("/versions/")[0] if version else "base", version)


class _Routes:
    """`tunefleet_inference_alias_version`, read from the routes when scraped."""

    def __init__(self) -> None:
        self.source: Callable[[], Mapping[str, str]] = dict

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "tunefleet_inference_alias_version",
            "1 for the version each alias routed here serves (`adapters/{adapter}@{alias}` to "
            "its version): what joins a version's metrics to the alias, champion or canary, "
            "that sends it traffic.",
            labels=["adapter", "alias", "version"],
        )
        for routed, version in sorted(self.source().items()):
            adapter, _, alias = routed.partition("@")
            family.add_metric([adapter, alias, version], 1)
        yield family


class InferenceMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        by_version = ["adapter", "version"]  # adapter "base" and version "" for the base model
        # The adapter pool sets `routes.source` to its routes.
        self.routes = _Routes()
        registry.register(self.routes)
        self.requests = Counter(
            "tunefleet_inference_requests",
            "Generation requests by adapter, version and outcome (ok, cancelled, invalid: the "
            "client's error, error); adapter 'unresolved' for requests that named no version "
            "that exists.",
            [*by_version, "outcome"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "tunefleet_inference_requests_in_flight",
            "Generation requests this replica is answering (waiting or generating): what a "
            "HorizontalPodAutoscaler scales InferenceService on.",
            registry=registry,
        )
        self.prompt_tokens = Counter(
            "tunefleet_inference_prompt_tokens",
            "Prompt tokens, by adapter and version.",
            by_version,
            registry=registry,
        )
        self.cached_prompt_tokens = Counter(
            "tunefleet_inference_prompt_cached_tokens",
            "Prompt tokens whose keys and values the engine took from an earlier prompt's "
            "(prefix caching), by adapter and version.",
            by_version,
            registry=registry,
        )
        self.generated_tokens = Counter(
            "tunefleet_inference_generated_tokens",
            "Generated tokens, by adapter and version.",
            by_version,
            registry=registry,
        )
        self.time_to_first_token = Histogram(
            "tunefleet_inference_time_to_first_token_seconds",
            "Time from a request's arrival to its first generated text.",
            by_version,
            buckets=LATENCY,
            registry=registry,
        )
        self.time_per_output_token = Histogram(
            "tunefleet_inference_time_per_output_token_seconds",
            "Time per generated token after the first.",
            by_version,
            buckets=PER_TOKEN,
            registry=registry,
        )
        self.latency = Histogram(
            "tunefleet_inference_request_seconds",
            "End-to-end latency of a request.",
            by_version,
            buckets=LATENCY,
            registry=registry,
        )
        self.queue_time = Histogram(
            "tunefleet_inference_queue_seconds",
            "Time a request waited before the engine started on it (adapter loading included).",
            by_version,
            buckets=LATENCY,
            registry=registry,
        )
        self.loaded = Gauge(
            "tunefleet_inference_loaded_adapters", "Adapter versions loaded.", registry=registry
        )
        self.cache = Counter(
            "tunefleet_inference_adapter_cache",
            "Adapter lookups by result (hit: loaded already; miss: loaded on demand).",
            ["result"],
            registry=registry,
        )
        self.loads = Counter(
            "tunefleet_inference_adapter_loads",
            "Adapter loads by outcome (loaded, failed).",
            ["outcome"],
            registry=registry,
        )
        self.load_seconds = Histogram(
            "tunefleet_inference_adapter_load_seconds",
            "Time to load an adapter version into an engine.",
            buckets=LATENCY,
            registry=registry,
        )
        self.evictions = Counter(
            "tunefleet_inference_adapter_evictions",
            "Adapter versions unloaded to make room.",
            registry=registry,
        )
        self.swaps = Counter(
            "tunefleet_inference_alias_swaps",
            "Alias moves followed, by outcome (swapped, failed: the old version keeps serving).",
            ["outcome"],
            registry=registry,
        )
        # The score, not the rating: a sum that never falls keeps rate() and increase() right
        # (a falling _sum would read as a counter reset).
        self.feedback_score = Summary(
            "tunefleet_inference_feedback_score",
            "Feedback as a score from 0 (rating -1, bad) to 1 (rating 1, good), by the adapter "
            "and version that answered; _sum / _count is the mean score.",
            by_version,
            registry=registry,
        )
        self.feedback = Counter(
            "tunefleet_inference_feedback",
            "Feedback recorded, by the adapter and version that answered, the rating's sign "
            "(negative, neutral, positive) and whether it carries a corrected answer (a training "
            "example for the retraining loop).",
            [*by_version, "rating", "corrected"],
            registry=registry,
        )
        self.swap_seconds = Histogram(
            "tunefleet_inference_swap_seconds",
            "Time from an alias move in the registry to the new version serving it.",
            buckets=LATENCY,
            registry=registry,
        )
        for result in ("hit", "miss"):
            self.cache.labels(result)
        for outcome in ("loaded", "failed"):
            self.loads.labels(outcome)
        for outcome in ("swapped", "failed"):
            self.swaps.labels(outcome)
        for outcome in OUTCOMES:  # requests that named no version that exists
            self.requests.labels(*UNRESOLVED, outcome)
        self._seen: set[str] = set()
        self.version_seen("")  # the base model

    def version_seen(self, version: str) -> None:
        """Every per-version series of `version` at zero, once: from then on its first request,
        error or rating is an increase. A series that appears at 1 hides that first event from
        increase() and rate() (TunefleetAdapterErrorRate, the feedback alerts)."""
        if version in self._seen:
            return
        self._seen.add(version)
        labels = version_labels(version)
        for outcome in OUTCOMES:
            self.requests.labels(*labels, outcome)
        for metric in (
            self.prompt_tokens,
            self.cached_prompt_tokens,
            self.generated_tokens,
            self.time_to_first_token,
            self.time_per_output_token,
            self.latency,
            self.queue_time,
            self.feedback_score,
        ):
            metric.labels(*labels)
        for rating in RATINGS:
            for corrected in ("false", "true"):
                self.feedback.labels(*labels, rating, corrected)
