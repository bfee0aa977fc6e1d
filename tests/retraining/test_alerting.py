"""The loop triggered as in production: a real Prometheus scrapes a real `tunefleet serve`, with
deploy/monitoring's rules; a real Alertmanager, with deploy/monitoring's route and receiver,
delivers the alert to the OpenAI front's webhook. Negative feedback with corrections fires
TunefleetAdapterNegativeFeedbackHigh; Alertmanager delivers it again every two seconds; one run
starts, trains, evaluates and promotes through the gate. Then a gate nothing passes: the next
run leaves prod where it was, with the reason.

Only the timings differ from deploy/: the alert fires without its `for` wait (the other alert
that starts runs, TunefleetAdapterRetrainDataReady, keeps its five minutes, so it stays out of
this test; promtool tests it), Alertmanager groups and repeats in seconds, and the webhook has
no bearer token (the server runs without authentication)."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import yaml

from tests.helpers import require_tool
from tests.retraining.test_loop import ADAPTER, FIXED, RECIPE, status
from tests.trainer.conftest import ANIMALS, chat_model
from tests.training.conftest import lora_adapter
from tunefleet.client import Client
from tunefleet.demo.server import LocalServer, free_port
from tunefleet.v1 import retraining_pb2

__all__ = ["chat_model"]
MONITORING = Path(__file__).resolve().parents[2] / "deploy" / "monitoring"
pytestmark = pytest.mark.timeout(900)  # a generous bound for a busy machine, not a claim
Run = retraining_pb2.RetrainingRun
T = TypeVar("T")


def until(check: Callable[[], T | None], what: str, within: float = 240.0) -> T:
    """Poll `check` until it returns something (a state reached, not a time waited)."""
    deadline = time.monotonic() + within
    while (found := check()) is None or found is False:
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {within} s: {what}")
        time.sleep(0.25)
    return found


def get(url: str) -> Any:
    try:
        with urllib.request.urlopen(url, timeout=10) as answer:
            return answer.read().decode()
    except OSError:
        return None


def sample(metrics: str | None, name: str, **labels: str) -> float:
    """The sum of `name`'s samples with `labels` in a /metrics text."""
    total = 0.0
    for line in (metrics or "").splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


@pytest.fixture
def processes() -> Iterator[Callable[..., None]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(*command: str, log: Path) -> None:
        with log.open("wb") as out:
            started.append(subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT))

    yield start
    for process in started:
        process.terminate()
    for process in started:
        process.wait(timeout=30)


@pytest.mark.promtool
def test_an_alert_on_negative_feedback_starts_one_run_that_promotes(
    tmp_path: Path,
    chat_model: Path,
    processes: Callable[..., None],
) -> None:
    prometheus = require_tool("prometheus", "Debian package prometheus")
    alertmanager = require_tool("prometheus-alertmanager", "Debian package prometheus-alertmanager")
    amtool = require_tool("amtool", "Debian package prometheus-alertmanager")
    checked = subprocess.run(
        [amtool, "check-config", str(MONITORING / "alertmanager.yaml")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    server = LocalServer(
        tmp_path / "platform",
        {
            "models": {"colours": str(chat_model)},
            "logging": {"level": "WARNING"},
            "training": {"heartbeat_seconds": 1, "poll_seconds": 0.2},
            "inference": {"base_model": "colours"},
            "retraining": {"trigger_seconds": 1, "poll_seconds": 0.2},
        },
    )
    with server, Client(server.target) as client:
        client.adapters.create("colours", base_model="colours")
        champion = client.adapters.upload_version(ADAPTER, lora_adapter(chat_model, tmp_path / "c"))
        client.adapters.set_alias(ADAPTER, "prod", champion.name)
        frozen = client.datasets.upload(
            "".join(
                json.dumps({"messages": [*status(a), {"role": "assistant", "content": FIXED}]})
                + "\n"
                for a in ANIMALS
            ).encode(),
            options={"validationFraction": 0},
        )
        policy: dict[str, Any] = {
            "adapter": ADAPTER,
            "evaluation": {
                "dataset": frozen.name,
                "split": "DATASET_SPLIT_TRAIN",
                "graders": [{"type": "exact_match"}],
                "gate": {"metric": "exact_match"},
                "sampling": {"maxTokens": 8},
            },
            "data": {"minNewExamples": 8, "includeChampionData": False},
            "recipe": RECIPE,
            "promotion": "PROMOTION_AUTO",
        }
        client.retraining.create_policy(policy)

        # Alertmanager with deploy/'s route and receiver, pointed at this front, in seconds.
        config = yaml.safe_load((MONITORING / "alertmanager.yaml").read_text())
        (route,) = config["route"]["routes"]
        route.update(group_wait="1s", group_interval="1s", repeat_interval="2s")
        (hook,) = next(r for r in config["receivers"] if r["name"] == route["receiver"])[
            "webhook_configs"
        ]
        hook["url"] = f"http://127.0.0.1:{server.openai_port}/v1/alertmanager/webhook"
        del hook["http_config"]
        (tmp_path / "alertmanager.yaml").write_text(yaml.safe_dump(config))
        am_port = free_port()
        processes(
            alertmanager,
            f"--config.file={tmp_path / 'alertmanager.yaml'}",
            f"--storage.path={tmp_path / 'am-data'}",
            f"--web.listen-address=127.0.0.1:{am_port}",
            "--cluster.listen-address=",
            log=tmp_path / "alertmanager.log",
        )
        # Prometheus with deploy/'s rules, firing at once, scraping the server every second.
        rules = yaml.safe_load((MONITORING / "prometheus-rules.yaml").read_text())["spec"]
        for group in rules["groups"]:
            for rule in group["rules"]:
                if rule.get("alert") == "TunefleetAdapterNegativeFeedbackHigh":
                    rule.pop("for")
        (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules))
        scrape = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(tmp_path / "rules.yaml")],
            "alerting": {
                "alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]
            },
            "scrape_configs": [
                {
                    "job_name": "tunefleet",
                    "static_configs": [{"targets": [f"127.0.0.1:{server.metrics_port}"]}],
                }
            ],
        }
        (tmp_path / "prometheus.yaml").write_text(yaml.safe_dump(scrape))
        prom_port = free_port()
        processes(
            prometheus,
            f"--config.file={tmp_path / 'prometheus.yaml'}",
            f"--storage.tsdb.path={tmp_path / 'prom-data'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
            log=tmp_path / "prometheus.log",
        )
        query = f"http://127.0.0.1:{prom_port}/api/v1/query?query="

        def scraped(name: str) -> bool:
            answer = get(query + name)
            return bool(answer and json.loads(answer)["data"]["result"])

        def rate(tag: str) -> None:
            answer = client.inference.generate(
                messages=status(ANIMALS[len(tag) % len(ANIMALS)], tag),
                adapter=f"{ADAPTER}@prod",
                max_tokens=8,
            )
            client.inference.feedback(answer.response_id, rating=-1, corrected_text=FIXED)

        # The first rating creates the series; once Prometheus has it, the rest is an increase.
        rate("first")
        until(lambda: scraped("tunefleet_inference_feedback_total"), "the feedback series scraped")
        for index in range(24):
            rate(f"r{index}")

        am_metrics = f"http://127.0.0.1:{am_port}/metrics"
        until(
            lambda: (
                sample(get(am_metrics), "alertmanager_notifications_total", integration="webhook")
                >= 3
            ),
            "Alertmanager delivering the alert again and again",
        )
        (run,) = until(lambda: list(client.retraining.runs("colours")) or None, "a run")
        run = client.retraining.wait(run.name)
        until(
            lambda: (
                sample(get(am_metrics), "alertmanager_notifications_total", integration="webhook")
                >= 6
            ),
            "more deliveries of the same firing",
        )
        failed = sample(get(am_metrics), "alertmanager_notifications_failed_total")
        runs = list(client.retraining.runs("colours"))
        prod = next(a.version for a in client.adapters.aliases(ADAPTER) if a.name.endswith("prod"))

        # The policy made again with a gate nothing passes: the alert still firing starts one
        # run of it (a new policy's runs are its own), which leaves prod where it was.
        client.retraining.delete_policy("colours")
        policy["evaluation"]["gate"]["minImprovement"] = 2.0
        client.retraining.create_policy(policy)
        (second,) = until(lambda: list(client.retraining.runs("colours")) or None, "a new run")
        second = client.retraining.wait(second.name)
        after = next(a.version for a in client.adapters.aliases(ADAPTER) if a.name.endswith("prod"))

    assert failed == 0
    assert [r.name for r in runs] == [run.name]  # one run however often it was delivered
    assert run.trigger == Run.TRIGGER_ALERT
    assert run.trigger_detail.startswith("TunefleetAdapterNegativeFeedbackHigh firing since ")
    history = [(e.time.ToJsonString(), e.message) for e in run.events]
    assert (run.state, run.outcome) == (Run.STATE_SUCCEEDED, Run.OUTCOME_PROMOTED), history
    # The alert fires at about 20 ratings (Prometheus extrapolates increase()); the run takes
    # what there is when it starts, at least the policy's 8.
    assert 8 <= run.sft_examples <= 25 and len(run.feedback) == run.sft_examples
    assert prod == run.challenger_version
    assert (second.state, second.outcome) == (Run.STATE_SUCCEEDED, Run.OUTCOME_GATE_FAILED)
    assert second.trigger == Run.TRIGGER_ALERT and second.gate_reasons
    assert after == prod  # the refused challenger never served
