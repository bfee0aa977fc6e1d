"""RetrainingService in the SDK: policies that retrain an adapter from its production feedback,
their runs, and the approval of a promotion."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Mapping
from typing import Any

from tunefleet.client.core import (
    Call,
    Emit,
    Feed,
    M,
    Program,
    Resource,
    operation,
    pages,
    stream,
    watching,
)
from tunefleet.client.errors import DeadlineExceeded, FailedPrecondition
from tunefleet.client.helpers import resource_name, to_message
from tunefleet.v1 import retraining_pb2, retraining_service_pb2, retraining_service_pb2_grpc

RetrainingRun = retraining_pb2.RetrainingRun
ENDED = {
    RetrainingRun.STATE_SUCCEEDED,
    RetrainingRun.STATE_FAILED,
    RetrainingRun.STATE_CANCELLED,
}
POLICIES = "retrainingPolicies"


class Retraining(Resource[M]):
    """RetrainingService: retraining policies and runs."""

    Stub = retraining_service_pb2_grpc.RetrainingServiceStub

    @operation
    def create_policy(
        self,
        policy: retraining_pb2.RetrainingPolicy | Mapping[str, Any],
        *,
        policy_id: str = "",
        request_id: str = "",
    ) -> Program[retraining_pb2.RetrainingPolicy]:
        """Create the retraining policy of an adapter, given as a `RetrainingPolicy` or its JSON
        form; its id defaults to the adapter's. Retried safely (a request id is generated when
        none is given).

        Example::

            client.retraining.create_policy({
                "adapter": "adapters/orders",
                "evaluation": {
                    "dataset": frozen.name, "split": "DATASET_SPLIT_TRAIN",
                    "graders": [{"type": "exact_match"}],
                    "gate": {"metric": "exact_match"},
                },
                "promotion": "PROMOTION_AUTO",
            })
        """
        request = retraining_service_pb2.CreateRetrainingPolicyRequest(
            retraining_policy=to_message(retraining_pb2.RetrainingPolicy, policy, "policy"),
            retraining_policy_id=policy_id,
            request_id=request_id or str(uuid.uuid4()),
        )
        created: retraining_pb2.RetrainingPolicy = yield Call(
            self.Stub, "CreateRetrainingPolicy", request, idempotent=True
        )
        return created

    @operation
    def get_policy(self, name: str) -> Program[retraining_pb2.RetrainingPolicy]:
        """A policy by name (`retrainingPolicies/{id}` or the id)."""
        request = retraining_service_pb2.GetRetrainingPolicyRequest(
            name=resource_name(POLICIES, name)
        )
        policy: retraining_pb2.RetrainingPolicy = yield Call(
            self.Stub, "GetRetrainingPolicy", request, idempotent=True
        )
        return policy

    @stream
    def policies(self, page_size: int = 100) -> Feed[retraining_pb2.RetrainingPolicy]:
        """Every policy, newest first."""
        request = retraining_service_pb2.ListRetrainingPoliciesRequest(page_size=page_size)
        yield from pages(self.Stub, "ListRetrainingPolicies", request, "retraining_policies")

    @operation
    def delete_policy(self, name: str) -> Program[None]:
        """Delete a policy and its runs (refused while a run is in progress)."""
        request = retraining_service_pb2.DeleteRetrainingPolicyRequest(
            name=resource_name(POLICIES, name)
        )
        yield Call(self.Stub, "DeleteRetrainingPolicy", request, idempotent=True)

    @operation
    def start(
        self,
        policy: str,
        *,
        trigger: RetrainingRun.Trigger.ValueType = RetrainingRun.TRIGGER_MANUAL,
        detail: str = "",
        request_id: str = "",
    ) -> Program[retraining_pb2.RetrainingRun]:
        """Start a run of `policy`; retried safely (a request id is generated when none is
        given). FailedPrecondition (RUN_IN_PROGRESS) while another run of the policy is.

        Example::

            run = client.retraining.start("orders")
            run = client.retraining.wait(run.name)
            print(run.outcome, list(run.gate_reasons))
        """
        request = retraining_service_pb2.CreateRetrainingRunRequest(
            parent=resource_name(POLICIES, policy),
            retraining_run=RetrainingRun(trigger=trigger, trigger_detail=detail),
            request_id=request_id or str(uuid.uuid4()),
        )
        run: retraining_pb2.RetrainingRun = yield Call(
            self.Stub, "CreateRetrainingRun", request, idempotent=True
        )
        return run

    @operation
    def get_run(self, name: str) -> Program[retraining_pb2.RetrainingRun]:
        """A run by name, `retrainingPolicies/{policy}/runs/{run}`."""
        request = retraining_service_pb2.GetRetrainingRunRequest(name=name)
        run: retraining_pb2.RetrainingRun = yield Call(
            self.Stub, "GetRetrainingRun", request, idempotent=True
        )
        return run

    @stream
    def runs(self, policy: str, page_size: int = 100) -> Feed[retraining_pb2.RetrainingRun]:
        """A policy's runs, newest first."""
        request = retraining_service_pb2.ListRetrainingRunsRequest(
            parent=resource_name(POLICIES, policy), page_size=page_size
        )
        yield from pages(self.Stub, "ListRetrainingRuns", request, "retraining_runs")

    @stream
    def watch(self, name: str, *, timeout: float | None = None) -> Feed[RetrainingRun]:
        """The run now, then each time it changes, until it has ended; a dropped stream is
        opened again. `timeout` bounds the whole iteration (DeadlineExceeded)."""
        request = retraining_service_pb2.WatchRetrainingRunRequest(name=name)
        yield from watching(self.Stub, "WatchRetrainingRun", request, timeout)

    @operation
    def wait(
        self,
        name: str,
        *,
        until: Callable[[RetrainingRun], bool] | None = None,
        timeout: float | None = None,
        on_change: Callable[[RetrainingRun], None] | None = None,
    ) -> Program[retraining_pb2.RetrainingRun]:
        """Block until the run has ended (or `until(run)` holds, such as waiting for approval)
        and return it; `on_change` sees it each time it changes. Raises DeadlineExceeded after
        `timeout`.

        Example::

            run = client.retraining.wait(
                run.name, until=lambda r: r.state == r.STATE_AWAITING_APPROVAL
            )
        """
        done = until or (lambda run: run.state in ENDED)
        watched = Retraining.watch.function(self, name, timeout=timeout)
        last: RetrainingRun | None = None
        send: Any = None
        error: Exception | None = None
        while True:  # `each`, stopping at the first run that is `done`
            try:
                step = watched.throw(error) if error else watched.send(send)
            except StopIteration:
                break
            send, error = None, None
            if isinstance(step, Emit):
                last = step.value
                if on_change is not None:
                    on_change(last)
                if done(last):
                    watched.close()  # the stream itself is cancelled when this call returns
                    return last
                continue
            try:
                send = yield step
            except Exception as failure:
                error = failure
        if last is not None and last.state in ENDED:  # and `until` never held
            state = RetrainingRun.State.Name(last.state)
            raise FailedPrecondition(
                f"{name} ended ({state}) before what was waited for", reason="RUN_ENDED"
            )
        raise DeadlineExceeded(f"{name} has not ended after {timeout} s")

    @operation
    def approve(self, name: str, *, reason: str = "") -> Program[retraining_pb2.RetrainingRun]:
        """Approve the promotion of a run awaiting approval: the champion alias moves to the
        challenger, unless someone moved it since the run started (outcome CHAMPION_MOVED)."""
        request = retraining_service_pb2.ApproveRetrainingRunRequest(name=name, reason=reason)
        run: retraining_pb2.RetrainingRun = yield Call(self.Stub, "ApproveRetrainingRun", request)
        return run

    @operation
    def reject(self, name: str, *, reason: str = "") -> Program[retraining_pb2.RetrainingRun]:
        """Reject the promotion of a run awaiting approval; the champion stays."""
        request = retraining_service_pb2.RejectRetrainingRunRequest(name=name, reason=reason)
        run: retraining_pb2.RetrainingRun = yield Call(self.Stub, "RejectRetrainingRun", request)
        return run

    @operation
    def cancel(self, name: str) -> Program[retraining_pb2.RetrainingRun]:
        """Stop a run in progress (and its training job)."""
        request = retraining_service_pb2.CancelRetrainingRunRequest(name=name)
        run: retraining_pb2.RetrainingRun = yield Call(
            self.Stub, "CancelRetrainingRun", request, idempotent=True
        )
        return run
