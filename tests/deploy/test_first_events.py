"""The alerts fire from the first event after a (re)start (deploy/monitoring/prometheus-rules.yaml).

`increase()` and `rate()` need two samples of a series: a counter series that appears only with
its first event, at 1, hides that event from them, and an alert such as "a training job failed
in the last hour" never fires for the first failure after a restart. So a real server is started
and scraped: the series each alert reads exist at 0 from the start (or from when the process
meets a version or a policy), and a first event moves such a series from 0 to 1. Then the
scraped series, named and labelled exactly as exported, feed one `promtool test rules` case per
alert: absent (before the process started), 0, then the first events; each alert must fire.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.client.conftest import UPLOAD_OPTIONS, colours, job_spec
from tests.deploy.test_monitoring import alert_names, rule_groups
from tests.helpers import require_tool
from tests.trainer.conftest import chat_model
from tests.training.conftest import lora_adapter
from tunefleet.app.services import SERVICES
from tunefleet.client import Client
from tunefleet.demo.server import LocalServer

__all__ = ["chat_model", "colours"]

Labels = frozenset[tuple[str, str]]
Scrape = dict[tuple[str, Labels], float]


def scrape(server: LocalServer) -> Scrape:
    with urllib.request.urlopen(server.metrics_url, timeout=30) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def find(scraped: Scrape, name: str, **labels: str) -> tuple[str, float]:
    """The one series of `name` with `labels` (among its others), written as promtool's input
    series are, and its value."""
    found = [
        (dict(key), value)
        for (series, key), value in scraped.items()
        if series == name and labels.items() <= dict(key).items()
    ]
    assert len(found) == 1, f"{name}{labels}: {len(found)} series"
    ((all_labels, value),) = found
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(all_labels.items()))
    return f"{name}{{{inner}}}", value


@dataclass
class Observed:
    fresh: Scrape  # the server just started
    loaded: Scrape  # two versions loaded, nothing asked of them yet
    later: Scrape  # after the first events
    prod: str  # the version `adapters/shop@prod` serves
    candidate: str  # and `@candidate`


@pytest.fixture(scope="module")
def observed(
    tmp_path_factory: pytest.TempPathFactory, chat_model: Path, colours: Path
) -> Iterator[Observed]:
    work = tmp_path_factory.mktemp("first-events")
    # A model whose weights are garbage: a job on it is accepted, then fails in the trainer.
    broken = work / "broken"
    shutil.copytree(chat_model, broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file" * 100)
    server = LocalServer(
        work / "server",
        {
            "models": {"colours": str(chat_model), "broken": str(broken)},
            "logging": {"level": "WARNING"},
            "training": {"poll_seconds": 0.2},
            "inference": {"base_model": "colours"},
            "retraining": {"trigger_seconds": 0.5},
        },
    )
    with server, Client(server.target) as client:
        fresh = scrape(server)
        client.adapters.create("shop", base_model="colours")
        prod, candidate = (
            client.adapters.upload_version("shop", lora_adapter(chat_model, work / name)).name
            for name in ("one", "two")
        )
        client.adapters.set_alias("shop", "prod", prod)
        client.adapters.set_alias("shop", "candidate", candidate)
        for alias in ("prod", "candidate"):
            client.inference.load(f"adapters/shop@{alias}")
        loaded = scrape(server)

        answer = client.inference.generate(
            messages=[{"role": "user", "content": "Which colour goes with the cat?"}],
            adapter="adapters/shop@candidate",
            max_tokens=4,
        )
        client.inference.feedback(answer.response_id, rating=-1, corrected_text="red")
        dataset = client.datasets.upload(colours, options=UPLOAD_OPTIONS).name
        job = client.training_jobs.create(
            {**job_spec(dataset, "adapters/nothing"), "baseModel": "broken"}
        )
        assert client.training_jobs.wait(job.name, timeout=120).state == job.STATE_FAILED
        client.retraining.create_policy(
            {
                "adapter": "adapters/shop",
                "evaluation": {
                    "dataset": dataset,
                    "graders": [{"type": "exact_match"}],
                    "gate": {"metric": "exact_match"},
                },
            }
        )
        later = scrape(server)
        for _ in range(600):  # the policy's first trigger check sets its gauges
            if any(name == "tunefleet_retraining_pending_examples" for name, _ in later):
                break
            time.sleep(0.1)
            later = scrape(server)
        yield Observed(fresh, loaded, later, prod, candidate)


def test_a_fresh_server_exports_at_zero_the_series_the_alerts_count(observed: Observed) -> None:
    fresh = observed.fresh
    for name, labels in [
        ("tunefleet_training_jobs_ended_total", {"state": "failed"}),
        ("tunefleet_training_job_duration_seconds_count", {"state": "failed"}),
        ("tunefleet_evaluation_jobs_ended_total", {"state": "failed"}),
        ("tunefleet_inference_requests_total", {"adapter": "base", "outcome": "error"}),
        ("tunefleet_inference_requests_total", {"adapter": "unresolved", "outcome": "invalid"}),
        ("tunefleet_inference_adapter_loads_total", {"outcome": "failed"}),
        ("tunefleet_inference_alias_swaps_total", {"outcome": "failed"}),
        ("tunefleet_dataset_records_rejected_total", {"code": "INVALID_JSON"}),
        ("tunefleet_training_queue_depth", {}),
    ]:
        assert find(fresh, name, **labels)[1] == 0, (name, labels)
    # Every method of every service, for each code TunefleetServerErrors counts.
    for spec in SERVICES.values():
        for method in spec.descriptor.methods:
            for code in ("INTERNAL", "UNKNOWN", "DATA_LOSS"):
                service = spec.descriptor.full_name
                labels = {"grpc_service": service, "grpc_method": method.name, "grpc_code": code}
                assert find(fresh, "tunefleet_grpc_server_requests_total", **labels)[1] == 0


def test_a_version_and_a_policy_have_their_series_at_zero_from_when_they_are_met(
    observed: Observed,
) -> None:
    for version in (observed.prod, observed.candidate):
        for outcome in ("ok", "error", "cancelled", "invalid"):
            counted = find(
                observed.loaded,
                "tunefleet_inference_requests_total",
                version=version,
                outcome=outcome,
            )
            assert counted[1] == 0
        for rating in ("negative", "neutral", "positive"):
            for corrected in ("true", "false"):
                labels = {"version": version, "rating": rating, "corrected": corrected}
                assert find(observed.loaded, "tunefleet_inference_feedback_total", **labels)[1] == 0
        assert (
            find(
                observed.loaded,
                "tunefleet_inference_request_seconds_bucket",
                version=version,
                le="+Inf",
            )[1]
            == 0
        )
        assert (
            find(observed.loaded, "tunefleet_inference_feedback_score_count", version=version)[1]
            == 0
        )
    for outcome in ("failed", "promoted", "gate_failed", "cancelled"):
        labels = {"policy": "shop", "adapter": "adapters/shop", "outcome": outcome}
        assert find(observed.later, "tunefleet_retraining_runs_ended_total", **labels)[1] == 0


def test_a_first_event_moves_its_series_from_zero_to_one(observed: Observed) -> None:
    """The same series, labels and all, before and after: not a new series at 1."""
    for before, name, labels in [
        (observed.fresh, "tunefleet_training_jobs_ended_total", {"state": "failed"}),
        (
            observed.loaded,
            "tunefleet_inference_feedback_total",
            {"version": observed.candidate, "rating": "negative", "corrected": "true"},
        ),
        (
            observed.loaded,
            "tunefleet_inference_requests_total",
            {"version": observed.candidate, "outcome": "ok"},
        ),
    ]:
        assert find(before, name, **labels) == (find(observed.later, name, **labels)[0], 0)
        assert find(observed.later, name, **labels)[1] == 1, (name, labels)


# Minutes (samples a minute apart) of each promtool case: the series are absent for BEFORE
# minutes (the process has not started), exported at 0 for ZERO minutes, then the events come.
BEFORE, ZERO = 30, 10
START = f"_x{BEFORE - 1} 0x{ZERO - 1}"  # absent, then 0
QUIET = f"{START} 0x60"  # a series exported at 0 that nothing moves
ONCE = f"{START} 1x60"  # one event, then no more


def rising(step: float) -> str:
    """Absent, 0, then `step` more every minute."""
    return f"{START} {step}+{step}x60"


def cases(observed: Observed) -> list[dict[str, Any]]:
    """A promtool case per alert: its series as scraped, the minute at which it must fire, and
    the labels it fires with."""
    later, loaded, fresh = observed.later, observed.loaded, observed.fresh
    prod, candidate = observed.prod, observed.candidate
    shop = {"adapter": "adapters/shop"}

    def series(scraped: Scrape, values: str, name: str, **labels: str) -> dict[str, str]:
        return {"series": find(scraped, name, **labels)[0], "values": values}

    def feedback(version: str, negative: str, positive: str) -> list[dict[str, str]]:
        """A version's feedback series: negative ratings with a correction and positive ones
        without as given; the others at 0."""
        chosen = {("negative", "true"): negative, ("positive", "false"): positive}
        return [
            series(
                loaded,
                chosen.get((rating, corrected), QUIET),
                "tunefleet_inference_feedback_total",
                version=version,
                rating=rating,
                corrected=corrected,
            )
            for rating in ("negative", "neutral", "positive")
            for corrected in ("true", "false")
        ]

    buckets = [
        # Every request takes 10 to 30 s: the buckets from 30 s up count them.
        series(loaded, rising(1) if float(le) >= 30 else QUIET, name, version=candidate, le=le)
        for name, labels in loaded
        if name == "tunefleet_inference_request_seconds_bucket" and ("version", candidate) in labels
        for le in (dict(labels)["le"],)
    ]
    assert len(buckets) > 10
    requests = "tunefleet_inference_requests_total"
    score = "tunefleet_inference_feedback_score"
    gate = (
        'tunefleet_evaluation_gate_passed{{adapter="adapters/shop",candidate="challenger",'
        'dataset="datasets/d",version="{}"}}'
    )
    day = 24 * 60
    return [
        {
            "alert": "TunefleetAdapterErrorRate",
            "series": [
                series(loaded, rising(1), requests, version=candidate, outcome="error"),
                series(loaded, rising(5), requests, version=candidate, outcome="ok"),
            ],
            "at": 60,
            "labels": {**shop, "version": candidate},
        },
        {
            "alert": "TunefleetAdapterLatencyHigh",
            "series": buckets,
            "at": 60,
            "labels": {**shop, "version": candidate},
        },
        {
            # A day of ratings around 0.8 from the process before the restart, then ratings
            # around 0.3 from the new process's zero.
            "alert": "TunefleetFeedbackDropping",
            "series": [
                series(loaded, f"0+5x{day} _x4 0 5+5x90", f"{score}_count", version=prod),
                series(loaded, f"0+4x{day} _x4 0 1.5+1.5x90", f"{score}_sum", version=prod),
            ],
            "at": day + 5 + 75,
            "labels": shop,
        },
        {
            "alert": "TunefleetAdapterNegativeFeedbackHigh",
            "series": feedback(candidate, negative=rising(1), positive=rising(1)),
            "at": 70,
            "labels": shop,
        },
        {
            "alert": "TunefleetCanaryWorseThanChampion",
            "series": [
                *feedback(prod, negative=QUIET, positive=rising(2)),
                *feedback(candidate, negative=rising(1), positive=rising(1)),
                *(
                    series(
                        later,
                        f"_x{BEFORE - 1} 1x70",
                        "tunefleet_inference_alias_version",
                        alias=alias,
                    )
                    for alias in ("prod", "candidate")
                ),
            ],
            "at": 70,
            "labels": shop,
        },
        {
            "alert": "TunefleetTrainingJobsFailing",
            "series": [series(fresh, ONCE, "tunefleet_training_jobs_ended_total", state="failed")],
            "at": 45,
            "labels": {},
        },
        {
            "alert": "TunefleetTrainingQueueBacklog",
            "series": [series(fresh, f"{START} 6x90", "tunefleet_training_queue_depth")],
            "at": 110,
            "labels": {},
        },
        {
            # The policy's gauges appear with the first trigger check.
            "alert": "TunefleetAdapterRetrainDataReady",
            "series": [
                series(
                    later,
                    f"_x{BEFORE - 1} 0x{ZERO - 1} 25x30",
                    "tunefleet_retraining_pending_examples",
                ),
                series(
                    later, f"_x{BEFORE - 1} 20x{ZERO + 30}", "tunefleet_retraining_min_new_examples"
                ),
            ],
            "at": 50,
            "labels": {**shop, "policy": "shop"},
        },
        {
            "alert": "TunefleetRetrainingRunsFailing",
            "series": [
                series(
                    later,
                    ONCE,
                    "tunefleet_retraining_runs_ended_total",
                    outcome="failed",
                )
            ],
            "at": 45,
            "labels": shop,
        },
        {
            # The gate's gauge appears with the evaluation's end (at 0: failed); its labels are
            # the evaluation's (no evaluation runs here).
            "alert": "TunefleetServingAVersionThatFailedEvaluation",
            "series": [
                {"series": gate.format(candidate), "values": f"_x{BEFORE + ZERO - 1} 0x40"},
                series(loaded, rising(5), requests, version=candidate, outcome="ok"),
            ],
            "at": 60,
            "labels": {**shop, "version": candidate},
        },
        {
            "alert": "TunefleetEvaluationJobsFailing",
            "series": [
                series(
                    fresh,
                    ONCE,
                    "tunefleet_evaluation_jobs_ended_total",
                    state="failed",
                )
            ],
            "at": 45,
            "labels": {},
        },
        {
            "alert": "TunefleetServerErrors",
            "series": [
                series(
                    fresh,
                    rising(1),
                    "tunefleet_grpc_server_requests_total",
                    grpc_method="GetAdapter",
                    grpc_code="INTERNAL",
                )
            ],
            "at": 50,
            "labels": {"grpc_service": "tunefleet.v1.AdapterService", "grpc_method": "GetAdapter"},
        },
    ]


def promtool_case(
    name: str,
    series: list[dict[str, str]],
    alert: str,
    at: int,
    labels: dict[str, str],
    fires: bool = True,
) -> dict[str, Any]:
    by = ", ".join(sorted(labels))
    inner = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    return {
        "name": name,
        "interval": "1m",
        "input_series": series,
        "promql_expr_test": [
            {
                "expr": f'count by ({by}) (ALERTS{{alertname="{alert}",alertstate="firing"}})',
                "eval_time": f"{at}m",
                "exp_samples": [{"labels": f"{{{inner}}}", "value": 1}] if fires else [],
            }
        ],
    }


@pytest.mark.promtool
def test_every_alert_fires_on_the_first_events_after_a_restart(
    observed: Observed, tmp_path: Path
) -> None:
    promtool = require_tool("promtool", "Debian package prometheus")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rule_groups()))
    every = cases(observed)
    assert {case["alert"] for case in every} == alert_names()  # a new alert needs its case
    tests = [
        promtool_case(
            f"{case['alert']}: the first events after a restart",
            case["series"],
            case["alert"],
            case["at"],
            case["labels"],
        )
        for case in every
    ]
    failed = find(observed.fresh, "tunefleet_training_jobs_ended_total", state="failed")[0]
    late = find(
        observed.loaded,
        "tunefleet_inference_feedback_total",
        version=observed.candidate,
        rating="negative",
        corrected="true",
    )[0]
    tests += [
        # Why: the same failure in a series that appears at 1 is not an increase.
        promtool_case(
            "a failure counted in a series that appears with it",
            [{"series": failed, "values": f"_x{BEFORE + ZERO - 1} 1x20"}],
            "TunefleetTrainingJobsFailing",
            45,
            {},
            fires=False,
        ),
        # A replica that never served a version creates its feedback series with their first
        # ratings: here 10 negative and 10 positive ones recorded between two scrapes, and no
        # more. The rules' feedback increases count such a series whole (increase() alone: 0).
        promtool_case(
            "a burst of feedback on a version first met through its feedback",
            [
                {"series": late, "values": f"_x{BEFORE + ZERO - 1} 10x60"},
                {
                    "series": late.replace('rating="negative"', 'rating="positive"').replace(
                        'corrected="true"', 'corrected="false"'
                    ),
                    "values": f"_x{BEFORE + ZERO - 1} 10x60",
                },
            ],
            "TunefleetAdapterNegativeFeedbackHigh",
            60,
            {"adapter": "adapters/shop"},
        ),
    ]
    (tmp_path / "first_events_test.yaml").write_text(
        yaml.safe_dump({"rule_files": ["rules.yaml"], "evaluation_interval": "1m", "tests": tests})
    )
    result = subprocess.run(
        [promtool, "test", "rules", "first_events_test.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
