"""An alias's canary (prod 90 / candidate 10): the split measured on real traffic, sticky by
routing key, followed at once when it changes, and never a failed request for it; in one process
and with AdapterService and InferenceService as separate processes."""

from __future__ import annotations

import asyncio
import random
import uuid
from collections import Counter
from pathlib import Path

import grpc
import pytest

from tests.inference.conftest import Served, Serving
from tunefleet.v1 import adapter_pb2, adapter_service_pb2, inference_pb2, inference_service_pb2

REQUESTS = 1000
CONCURRENCY = 32


async def canary(
    serving: Serving, percent: int, other: str = "candidate"
) -> adapter_pb2.AdapterAlias:
    alias: adapter_pb2.AdapterAlias = await serving.adapters.SetAdapterAliasCanary(
        adapter_service_pb2.SetAdapterAliasCanaryRequest(
            name="adapters/x/aliases/prod",
            canary=adapter_pb2.AliasCanary(alias="candidate", percent=percent),
            reason="canary test",
        )
    )
    return alias


async def ask(serving: Serving, key: str = "") -> str:
    answer = await serving.inference.Generate(
        inference_service_pb2.GenerateRequest(
            adapter="adapters/x@prod",
            prompt="hello",
            sampling=inference_pb2.SamplingParams(max_tokens=1),
            routing_key=key,
        )
    )
    return str(answer.adapter_version)


async def under_load(serving: Serving, keys: list[str]) -> Counter[str]:
    """Every key's request, CONCURRENCY at a time; the versions that answered."""
    slots = asyncio.Semaphore(CONCURRENCY)

    async def one(key: str) -> str:
        async with slots:
            return await ask(serving, key)

    return Counter(await asyncio.gather(*(one(key) for key in keys)))


async def split_as_asked(serving: Serving, served: Served) -> None:
    prod = await serving.register("x", served.adapters["alpha"])
    candidate = await serving.register("x", served.adapters["beta"])
    await serving.alias("prod", prod)
    await serving.alias("candidate", candidate)
    assert await ask(serving) == prod  # routed, without a canary

    changed = await canary(serving, 10)
    assert (changed.canary.alias, changed.canary.percent) == ("candidate", 10)
    rng = random.Random(7)
    keys = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(REQUESTS)]
    # The server follows the change through its watch: wait until a request lands on the canary.
    while await ask(serving) != candidate:
        pass
    answered = await under_load(serving, keys)
    assert set(answered) == {prod, candidate}
    share = answered[candidate] / REQUESTS
    assert abs(share - 0.10) <= 0.03, answered
    # One key, one side: a user's conversation does not flip between versions.
    sticky = [await ask(serving, keys[0]) for _ in range(5)]
    assert len(set(sticky)) == 1

    # Removing the canary sends everything back to prod, without a failed request on the way.
    back = await canary(serving, 0)
    assert not back.HasField("canary")
    while await ask(serving, keys[0]) != prod or (await under_load(serving, keys[:50]))[candidate]:
        pass
    assert await under_load(serving, keys[:200]) == Counter({prod: 200})
    moves = await serving.adapters.ListAliasMoves(
        adapter_service_pb2.ListAliasMovesRequest(parent="adapters/x/aliases/prod")
    )
    assert [(m.canary_changed, m.canary.percent) for m in moves.alias_moves[:2]] == [
        (True, 0),
        (True, 10),
    ]


async def test_a_canary_splits_traffic_as_asked(serving: Serving, served: Served) -> None:
    await split_as_asked(serving, served)


async def test_a_canary_splits_traffic_across_processes(
    serving_processes: Serving, served: Served
) -> None:
    await split_as_asked(serving_processes, served)


async def test_a_canary_that_cannot_answer_leaves_requests_on_prod(
    serving: Serving, served: Served, kinds: dict[str, Path]
) -> None:
    prod = await serving.register("x", served.adapters["alpha"])
    unservable = await serving.register("x", kinds["bias"])  # the PEFT engine refuses LoRA bias
    await serving.alias("prod", prod)
    await serving.alias("candidate", unservable)
    await canary(serving, 50)
    rng = random.Random(8)
    keys = [str(uuid.UUID(int=rng.getrandbits(128))) for _ in range(100)]
    assert await under_load(serving, keys) == Counter({prod: 100})

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await serving.adapters.DeleteAdapterAlias(
            adapter_service_pb2.DeleteAdapterAliasRequest(name="adapters/x/aliases/candidate")
        )
    assert refused.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "remove that canary first" in str(refused.value.details())
    for bad, field in (
        (adapter_pb2.AliasCanary(alias="candidate", percent=100), "canary.percent"),
        (adapter_pb2.AliasCanary(alias="nothing", percent=10), "canary.alias"),
        (adapter_pb2.AliasCanary(alias="prod", percent=10), "canary.alias"),
        (adapter_pb2.AliasCanary(alias="", percent=10), "canary.alias"),
    ):
        with pytest.raises(grpc.aio.AioRpcError) as invalid:
            await serving.adapters.SetAdapterAliasCanary(
                adapter_service_pb2.SetAdapterAliasCanaryRequest(
                    name="adapters/x/aliases/prod", canary=bad
                )
            )
        assert invalid.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert field in str(invalid.value.details())
