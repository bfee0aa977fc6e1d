"""`/v1/alertmanager/webhook`: Alertmanager's webhook (payload version 4) starts retraining runs.

Each firing alert with an `adapter` label (`adapters/{adapter}`, as tunefleet's metrics label it)
starts a run of the retraining policy of that adapter, with the caller's token (Alertmanager's
`http_config.authorization`, a writer). Alertmanager delivers a group again at every
`repeat_interval`, and each member of an HA pair delivers it too: the run's request id is made
from the group key, the adapter and the alert's start time, so every delivery of one firing
starts one run. Resolved alerts, and alerts without a policy to run, are answered as ignored
(200: Alertmanager would retry a refusal for nothing).
"""

from __future__ import annotations

import uuid
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from tunefleet.client import AsyncClient, FailedPrecondition
from tunefleet.openai_front.errors import bad_request
from tunefleet.v1 import retraining_pb2


async def webhook(request: Request, caller: AsyncClient) -> Response:
    payload = request.state.body
    if not isinstance(payload, dict) or payload.get("version") != "4":
        raise bad_request("version", "expected Alertmanager's webhook payload, version 4")
    alerts = payload.get("alerts")
    if not isinstance(alerts, list):
        raise bad_request("alerts", "must be a list")
    group = str(payload.get("groupKey", ""))
    policies: dict[str, str] | None = None  # adapter -> policy, read once if needed
    started: list[dict[str, str]] = []
    ignored: list[dict[str, str]] = []
    for index, alert in enumerate(alerts):
        if not isinstance(alert, dict) or not isinstance(alert.get("labels"), dict):
            raise bad_request(f"alerts[{index}].labels", "must be an object")
        labels: dict[str, Any] = alert["labels"]
        name, adapter = str(labels.get("alertname", "")), str(labels.get("adapter", ""))
        if alert.get("status") != "firing":
            ignored.append({"alert": name, "adapter": adapter, "reason": "not firing"})
            continue
        if not adapter:
            ignored.append({"alert": name, "adapter": "", "reason": "no adapter label"})
            continue
        if policies is None:
            policies = {p.adapter: p.name async for p in caller.retraining.policies()}
        policy = policies.get(adapter)
        if policy is None:
            ignored.append({"alert": name, "adapter": adapter, "reason": "no retraining policy"})
            continue
        since = str(alert.get("startsAt", ""))
        key = uuid.uuid5(uuid.NAMESPACE_URL, f"tunefleet:alert:{group}:{adapter}:{since}")
        try:
            run = await caller.retraining.start(
                policy,
                trigger=retraining_pb2.RetrainingRun.TRIGGER_ALERT,
                detail=f"{name} firing since {since}"[:500],
                request_id=str(key),
            )
        except FailedPrecondition as busy:
            if busy.reason != "RUN_IN_PROGRESS":
                raise
            reason = f"{busy.metadata.get('run', 'a run')} is in progress"
            ignored.append({"alert": name, "adapter": adapter, "reason": reason})
            continue
        started.append({"alert": name, "adapter": adapter, "run": run.name})
    return JSONResponse({"runs": started, "ignored": ignored})
