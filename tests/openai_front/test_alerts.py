"""`/v1/alertmanager/webhook`: Alertmanager's notifications start retraining runs, one per firing
however often it is delivered (repeats, both members of an HA pair at once)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from tests.inference.conftest import Served
from tests.openai_front.conftest import Front
from tunefleet.client import AsyncClient
from tunefleet.v1 import retraining_pb2

Run = retraining_pb2.RetrainingRun
STARTS = "2026-12-04T10:00:00.000Z"


def notification(
    *alerts: dict[str, Any], group: str = '{}/{action="retrain"}:{adapter="adapters/alpha"}'
) -> dict[str, Any]:
    """An Alertmanager webhook payload, version 4."""
    return {
        "version": "4",
        "groupKey": group,
        "truncatedAlerts": 0,
        "status": "firing",
        "receiver": "tunefleet-retraining",
        "groupLabels": {"adapter": "adapters/alpha"},
        "commonLabels": {},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
        "alerts": list(alerts),
    }


def alert(adapter: str = "adapters/alpha", status: str = "firing", starts: str = STARTS) -> Any:
    labels = {"alertname": "TunefleetAdapterRetrainDataReady", "action": "retrain"}
    if adapter:
        labels["adapter"] = adapter
    return {
        "status": status,
        "labels": labels,
        "annotations": {"summary": "new examples"},
        "startsAt": starts,
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus:9090/graph",
        "fingerprint": "0123456789abcdef",
    }


@pytest.fixture
async def policy(front: Front, served: Served) -> AsyncIterator[str]:
    await front.serving.register("alpha", served.adapters["alpha"])
    async with AsyncClient(target(front)) as client:
        record = {
            "messages": [
                {"role": "user", "content": "Say hi"},
                {"role": "assistant", "content": "hi"},
            ]
        }
        frozen = await client.datasets.upload(
            (json.dumps(record) + "\n").encode(), options={"validationFraction": 0}
        )
        created = await client.retraining.create_policy(
            {
                "adapter": "adapters/alpha",
                "evaluation": {
                    "dataset": frozen.name,
                    "split": "DATASET_SPLIT_TRAIN",
                    "graders": [{"type": "exact_match"}],
                    "gate": {"metric": "exact_match"},
                },
            }
        )
        yield created.name


def target(front: Front) -> str:
    assert front.serving.server is not None
    return f"127.0.0.1:{front.serving.server.port}"


async def runs(front: Front, policy: str) -> list[Run]:
    async with AsyncClient(target(front)) as client:
        return [run async for run in client.retraining.runs(policy)]


async def test_every_delivery_of_one_firing_starts_one_run(front: Front, policy: str) -> None:
    url = f"{front.base_url}/alertmanager/webhook"
    payload = notification(alert())
    async with httpx.AsyncClient(timeout=60) as http:
        # Both members of an HA pair at once, then Alertmanager's repeats.
        answers = await asyncio.gather(*(http.post(url, json=payload) for _ in range(2)))
        answers += [await http.post(url, json=payload) for _ in range(3)]
    assert [a.status_code for a in answers] == [200] * 5, [a.text for a in answers]
    (run,) = await runs(front, policy)
    assert run.trigger == Run.TRIGGER_ALERT
    assert run.trigger_detail == f"TunefleetAdapterRetrainDataReady firing since {STARTS}"
    for answer in answers:
        body = answer.json()
        named = [r["run"] for r in body["runs"]] + [i["reason"] for i in body["ignored"]]
        assert len(named) == 1 and run.name in named[0], body

    # A new firing of the group (a later start) is a new run, once the first has ended.
    async with AsyncClient(target(front)) as client:
        await client.retraining.wait(run.name)
    later = notification(alert(starts="2026-12-04T11:00:00.000Z"))
    async with httpx.AsyncClient(timeout=60) as http:
        answer = await http.post(url, json=later)
    assert answer.status_code == 200 and len(answer.json()["runs"]) == 1
    assert len(await runs(front, policy)) == 2


async def test_what_starts_no_run_is_answered_as_ignored(front: Front, policy: str) -> None:
    url = f"{front.base_url}/alertmanager/webhook"
    payload = notification(
        alert(status="resolved"), alert(adapter=""), alert(adapter="adapters/nobody")
    )
    async with httpx.AsyncClient(timeout=60) as http:
        answer = await http.post(url, json=payload)
        assert answer.status_code == 200
        assert [i["reason"] for i in answer.json()["ignored"]] == [
            "not firing",
            "no adapter label",
            "no retraining policy",
        ]
        assert await runs(front, policy) == []
        for body, param in (
            ({**notification(alert()), "version": "3"}, "version"),
            ({**notification(), "alerts": {}}, "alerts"),
            (notification({"status": "firing", "labels": "x"}), "alerts[0].labels"),
        ):
            refused = await http.post(url, json=body)
            assert refused.status_code == 400, refused.text
            assert refused.json()["error"]["param"] == param
        garbage = await http.post(url, content=b"\xff{", headers={"content-type": "text/plain"})
        assert garbage.status_code == 400
