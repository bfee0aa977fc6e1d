"""The improvement loop on a real embedded platform: answers of the served champion are rated and
corrected, a run turns the corrections into data (refusing an evaluation item), trains, evaluates
the challenger against the champion on a frozen set, and promotes only through the gate, by
compare-and-set against the champion it started from.

The task: the champion answers "Which colour goes with the X?" as it was trained ("Colour: grey.
Done."); the corrections all say "Done.", which a few dozen steps of LoRA teach the tiny model
exactly (its tokenizer knows the words), so the gate's paired exact-match comparison on the
frozen set has an unambiguous answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from tests.trainer.conftest import ANIMALS, LINEAR_LAYERS
from tests.training.conftest import (  # noqa: F401 (fixtures)
    Platform,
    big_model,
    chat_model,
    colour_records,
    job_request,
    lora_adapter,
    make_platform,
    platform_settings,
)
from tunefleet.client import (
    AlreadyExists,
    AsyncClient,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
)
from tunefleet.v1 import dataset_pb2, retraining_pb2, training_job_pb2

pytestmark = pytest.mark.timeout(900)  # a generous bound for a busy machine, not a claim
Run = retraining_pb2.RetrainingRun
ADAPTER = "adapters/colours"
FIXED = "Done."
RECIPE = {
    "method": "TRAINING_METHOD_LORA",
    "hyperparameters": {
        "learningRate": 1e-2,
        "epochs": 30,
        "maxSteps": 80,
        "microBatchSize": 4,
        "maxSequenceLength": 64,
    },
    # The output layer too: the tiny model then learns the fixed reply in a few dozen steps.
    "lora": {"rank": 8, "targetModules": [*LINEAR_LAYERS, "lm_head"]},
}


def status(animal: str, tag: str = "") -> list[dict[str, str]]:
    question = f"Which colour goes with the {animal}?" + (f" ({tag})" if tag else "")
    return [
        {"role": "system", "content": "Answer with one colour."},
        {"role": "user", "content": question},
    ]


@pytest.fixture
async def platform(make_platform: Any) -> Platform:  # noqa: F811
    return await make_platform(  # type: ignore[no-any-return]
        inference={"base_model": "colours"},
        retraining={"poll_seconds": 0.2, "trigger_seconds": 3600, "canary_seconds": 0.2},
        evaluation={"concurrency": 4},
    )


@pytest.fixture
async def client(platform: Platform) -> AsyncIterator[AsyncClient]:
    assert platform.server is not None
    async with AsyncClient(f"127.0.0.1:{platform.server.port}") as connected:
        yield connected


async def frozen_set(client: AsyncClient) -> str:
    """The evaluation items, one per animal, all in the train split."""
    lines = [
        json.dumps({"messages": [*status(animal), {"role": "assistant", "content": FIXED}]})
        for animal in ANIMALS
    ]
    dataset = await client.datasets.upload(
        ("\n".join(lines) + "\n").encode(),
        display_name="frozen",
        options={"validationFraction": 0},
    )
    return dataset.name


async def rate(client: AsyncClient, tags: list[str], leak: bool = False) -> list[str]:
    """Ask prod, rate each answer -1 with the correction; the feedback names (the leaked
    evaluation item's last, when `leak`)."""
    names = []
    asked = [status(ANIMALS[i % len(ANIMALS)], tag) for i, tag in enumerate(tags)]
    if leak:
        asked.append(status(ANIMALS[0]))  # word for word an item of the frozen set
    for messages in asked:
        answer = await client.inference.generate(
            messages=messages, adapter=f"{ADAPTER}@prod", max_tokens=8
        )
        feedback = await client.inference.feedback(
            answer.response_id, rating=-1, corrected_text=FIXED
        )
        names.append(feedback.name)
    return names


def policy(frozen: str, **fields: Any) -> dict[str, Any]:
    return {
        "adapter": ADAPTER,
        "evaluation": {
            "dataset": frozen,
            "split": "DATASET_SPLIT_TRAIN",
            "graders": [{"type": "exact_match"}],
            "gate": {"metric": "exact_match"},
            "sampling": {"maxTokens": 8},
        },
        "data": {"minNewExamples": 8, "includeChampionData": False},
        "promotion": "PROMOTION_AUTO",
        **fields,
    }


async def prod(client: AsyncClient) -> str:
    async for alias in client.adapters.aliases(ADAPTER):
        if alias.name.endswith("/aliases/prod"):
            return str(alias.version)
    return ""


async def train_champion(platform: Platform, client: AsyncClient) -> str:
    """The champion, trained on the colour task by a job (its recipe is what runs copy)."""
    dataset = await platform.upload(colour_records())
    job = await platform.create(dataset.name)
    done = await client.training_jobs.wait(job.name)
    assert done.output_adapter_version, done.error
    await client.adapters.set_alias(ADAPTER, "prod", done.output_adapter_version)
    return str(done.output_adapter_version)


async def upload_champion(
    client: AsyncClient,
    chat_model: Path,  # noqa: F811
    tmp_path: Path,
    name: str,
) -> str:
    """A champion that was not trained here: a random LoRA adapter, uploaded."""
    with contextlib.suppress(AlreadyExists):
        await client.adapters.create("colours", base_model="colours")
    folder = lora_adapter(chat_model, tmp_path / name)
    version = await client.adapters.upload_version(ADAPTER, folder)
    return str(version.name)


async def test_a_run_promotes_through_the_gate_and_an_impossible_gate_leaves_prod(
    platform: Platform, client: AsyncClient
) -> None:
    champion = await train_champion(platform, client)
    frozen = await frozen_set(client)
    await client.retraining.create_policy(policy(frozen, recipe=RECIPE))
    rated = await rate(client, [f"r{i}" for i in range(12)], leak=True)

    run = await client.retraining.wait((await client.retraining.start("colours")).name)

    assert (run.state, run.outcome) == (Run.STATE_SUCCEEDED, Run.OUTCOME_PROMOTED), run
    assert run.champion_version == champion and run.gate_passed
    assert run.held_out_examples == 1  # the leaked evaluation item never reached the data
    assert sorted(run.feedback) == sorted(rated[:-1])
    challenger = run.challenger_version
    assert await prod(client) == challenger
    version = await client.adapters.get_version(challenger)
    assert sorted(version.lineage.feedback) == sorted(rated[:-1])
    assert list(version.lineage.datasets) == [run.train_dataset]
    assert version.lineage.training_job == run.training_job
    job = await client.training_jobs.get(run.training_job)
    assert job.hyperparameters.max_steps == 80  # the policy's recipe over the champion's
    assert job.lora.rank == 8
    comparison = await client.evaluations.get(run.evaluation_jobs[0])
    assert [c.adapter_version for c in comparison.candidates] == [champion, challenger]
    answer = await client.inference.generate(
        messages=status("owl", "after"), adapter=f"{ADAPTER}@prod", max_tokens=8
    )
    assert (answer.adapter_version, answer.text.strip()) == (challenger, FIXED)
    moves = [m async for m in client.adapters.alias_moves(ADAPTER)]
    assert moves[0].to_version == challenger and run.name in moves[0].reason

    # A second run whose gate asks the impossible: prod stays, and the reason is recorded.
    await client.retraining.delete_policy("colours")
    impossible = policy(frozen, recipe=RECIPE)
    impossible["evaluation"]["gate"]["minImprovement"] = 2.0
    await client.retraining.create_policy(impossible)
    await rate(client, [f"s{i}" for i in range(8)])
    second = await client.retraining.wait((await client.retraining.start("colours")).name)
    assert (second.state, second.outcome) == (Run.STATE_SUCCEEDED, Run.OUTCOME_GATE_FAILED)
    assert second.gate_passed is False and second.gate_reasons
    assert "exact_match" in second.gate_reasons[0]
    assert await prod(client) == challenger
    candidates = [a async for a in client.adapters.aliases(ADAPTER) if a.name.endswith("candidate")]
    assert [a.version for a in candidates] == [challenger]  # not moved to the refused version


async def test_a_manual_move_during_an_auto_run_wins(
    platform: Platform,
    client: AsyncClient,
    chat_model: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    champion = await upload_champion(client, chat_model, tmp_path, "first")
    other = await upload_champion(client, chat_model, tmp_path, "second")
    await client.adapters.set_alias(ADAPTER, "prod", champion)
    await client.retraining.create_policy(policy(await frozen_set(client), recipe=RECIPE))
    await rate(client, [f"r{i}" for i in range(10)])
    started = await client.retraining.start("colours")
    # Once the run has pinned the champion, a person moves prod: the run's move must lose.
    pinned = await client.retraining.wait(started.name, until=lambda r: bool(r.champion_version))
    assert pinned.champion_version == champion
    await client.adapters.set_alias(ADAPTER, "prod", other, reason="hotfix by a person")
    run = await client.retraining.wait(started.name)
    assert (run.state, run.outcome) == (Run.STATE_SUCCEEDED, Run.OUTCOME_CHAMPION_MOVED), run
    assert run.gate_passed  # it would have been promoted
    assert await prod(client) == other
    assert "compare-and-set lost" in run.events[-1].message and other in run.events[-1].message


async def test_a_manual_policy_waits_for_a_person(
    platform: Platform,
    client: AsyncClient,
    chat_model: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    champion = await upload_champion(client, chat_model, tmp_path, "first")
    await client.adapters.set_alias(ADAPTER, "prod", champion)
    manual = policy(await frozen_set(client), recipe=RECIPE, promotion="PROMOTION_MANUAL")
    await client.retraining.create_policy(manual)
    await rate(client, [f"r{i}" for i in range(10)])
    first = await client.retraining.start("colours")
    with pytest.raises(FailedPrecondition) as busy:
        await client.retraining.start("colours")
    assert busy.value.reason == "RUN_IN_PROGRESS" and busy.value.metadata["run"] == first.name
    awaiting = lambda r: r.state == Run.STATE_AWAITING_APPROVAL  # noqa: E731
    waiting = await client.retraining.wait(first.name, until=awaiting)
    assert waiting.gate_passed and await prod(client) == champion
    candidate = [a async for a in client.adapters.aliases(ADAPTER) if a.name.endswith("candidate")]
    assert [a.version for a in candidate] == [waiting.challenger_version]
    with pytest.raises(NotFound):
        await client.retraining.approve(f"{first.name}x")
    rejected = await client.retraining.reject(first.name, reason="not now")
    assert (rejected.state, rejected.outcome) == (Run.STATE_SUCCEEDED, Run.OUTCOME_REJECTED)
    assert await prod(client) == champion
    with pytest.raises(FailedPrecondition):  # decided already
        await client.retraining.approve(first.name)

    await rate(client, [f"s{i}" for i in range(10)])
    second = await client.retraining.start("colours")
    waiting = await client.retraining.wait(second.name, until=awaiting)
    assert waiting.sft_examples == 20  # the rejected run's data is read again
    run = await client.retraining.approve(second.name, reason="looks right")
    assert (run.state, run.outcome) == (Run.STATE_SUCCEEDED, Run.OUTCOME_PROMOTED)
    assert await prod(client) == waiting.challenger_version
    approval = next(e for e in run.events if e.message.startswith("approved"))
    assert approval.actor == "anonymous" and "looks right" in approval.message


async def prod_alias(client: AsyncClient) -> Any:
    (alias,) = [a async for a in client.adapters.aliases(ADAPTER) if a.name.endswith("/prod")]
    return alias


async def canary_round(
    client: AsyncClient, champion: str, ratings: dict[str, float], tag: str
) -> Run:
    """A run whose challenger takes half of prod's traffic once the gate passed, while users ask
    prod and rate each answer by the side that gave it (`ratings`), until the run has ended. No
    request may fail on the way."""
    await rate(client, [f"{tag}{i}" for i in range(10)])
    started = await client.retraining.start("colours")
    await client.retraining.wait(started.name, until=lambda r: r.state == Run.STATE_CANARY)
    alias = await prod_alias(client)
    assert (alias.canary.alias, alias.canary.percent) == ("candidate", 50)
    ended: list[Run] = []
    failures: list[BaseException] = []

    async def watch() -> None:
        ended.append(await client.retraining.wait(started.name))

    async def traffic() -> None:
        turn = 0
        while not ended:
            key = f"user-{turn % 40}"
            turn += 1
            try:
                answer = await client.inference.generate(
                    messages=status("owl", key),
                    adapter=f"{ADAPTER}@prod",
                    max_tokens=4,
                    routing_key=key,
                )
            except Exception as error:  # a failed request is what this looks for
                failures.append(error)
                continue
            side = "champion" if answer.adapter_version == champion else "challenger"
            await client.inference.feedback(answer.response_id, rating=ratings[side])

    await asyncio.gather(watch(), traffic())
    assert not failures, failures[:3]
    assert not (await prod_alias(client)).HasField("canary")  # over, either way
    return ended[0]


async def test_a_canary_rated_worse_is_rolled_back_and_one_rated_well_is_promoted(
    platform: Platform,
    client: AsyncClient,
    chat_model: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Users rate the challenger's answers down: the rollback rule sends all traffic back to
    the champion. A second challenger, rated like the champion, holds its canary and is
    promoted."""
    champion = await upload_champion(client, chat_model, tmp_path, "first")
    await client.adapters.set_alias(ADAPTER, "prod", champion)
    canary = {"percent": 50, "minRatings": 8, "maxNegativeIncrease": 0.2}
    await client.retraining.create_policy(
        policy(await frozen_set(client), recipe=RECIPE, canary=canary)
    )

    run = await canary_round(client, champion, {"champion": 1, "challenger": -1}, "r")
    assert (run.state, run.outcome) == (Run.STATE_SUCCEEDED, Run.OUTCOME_ROLLED_BACK), run
    assert run.canary.challenger_ratings >= 8 and "rolled back" in run.events[-1].message
    assert (await prod_alias(client)).version == champion
    keys = [f"user-{index}" for index in range(40)]
    while True:  # every user is answered by the champion again, once the server has followed
        answers = [
            await client.inference.generate(
                messages=status("owl"), adapter=f"{ADAPTER}@prod", max_tokens=1, routing_key=key
            )
            for key in keys
        ]
        if {a.adapter_version for a in answers} == {champion}:
            break

    run = await canary_round(client, champion, {"champion": 1, "challenger": 1}, "s")
    assert (run.state, run.outcome) == (Run.STATE_SUCCEEDED, Run.OUTCOME_PROMOTED), run
    assert "the canary held" in "".join(e.message for e in run.events)
    assert (await prod_alias(client)).version == run.challenger_version


async def test_runs_without_enough_data_or_a_champion_end_with_the_reason(
    platform: Platform,
    client: AsyncClient,
    chat_model: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    champion = await upload_champion(client, chat_model, tmp_path, "first")
    frozen = await frozen_set(client)
    await client.retraining.create_policy(policy(frozen))
    run = await client.retraining.wait((await client.retraining.start("colours")).name)
    assert (run.state, run.error_reason) == (Run.STATE_FAILED, "NO_CHAMPION")
    await client.adapters.set_alias(ADAPTER, "prod", champion)
    await rate(client, ["a", "b"])
    run = await client.retraining.wait((await client.retraining.start("colours")).name)
    assert (run.state, run.outcome) == (Run.STATE_SUCCEEDED, Run.OUTCOME_NOT_ENOUGH_DATA)
    assert run.sft_examples == 2 and not run.training_job
    await rate(client, [f"r{i}" for i in range(8)])
    run = await client.retraining.wait((await client.retraining.start("colours")).name)
    # Enough data now, but the uploaded champion has no recipe to copy and the policy none.
    assert (run.state, run.error_reason) == (Run.STATE_FAILED, "NO_RECIPE"), run
    assert run.sft_examples == 10  # what the earlier runs left untrained is read again


async def test_bad_policies_are_refused_naming_the_field(
    platform: Platform,
    client: AsyncClient,
    chat_model: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    await upload_champion(client, chat_model, tmp_path, "first")
    frozen = await frozen_set(client)
    cases = {
        "retraining_policy.adapter": policy(frozen, adapter="adapters/nope"),
        "retraining_policy.evaluation": {"adapter": ADAPTER},
        "retraining_policy.evaluation.gate.metric": policy(
            frozen, evaluation={"dataset": frozen, "graders": [{"type": "exact_match"}]}
        ),
        "retraining_policy.evaluation.graders[0].type": policy(
            frozen,
            evaluation={
                "dataset": frozen,
                "graders": [{"type": "nonsense"}],
                "gate": {"metric": "nonsense"},
            },
        ),
        "retraining_policy.evaluation.dataset": policy(
            frozen,
            evaluation={
                "dataset": "datasets/nope",
                "graders": [{"type": "exact_match"}],
                "gate": {"metric": "exact_match"},
            },
        ),
        "retraining_policy.challenger_alias": policy(frozen, challengerAlias="prod"),
        "retraining_policy.data.positive_fraction": policy(frozen, data={"positiveFraction": 1.5}),
    }
    for field, bad in cases.items():
        with pytest.raises(InvalidArgument) as refused:
            await client.retraining.create_policy(bad)
        assert refused.value.field == field, (field, refused.value)
    assert [p async for p in client.retraining.policies()] == []
    await client.retraining.create_policy(policy(frozen))
    with pytest.raises(Exception) as twice:
        await client.retraining.create_policy(policy(frozen), policy_id="other")
    assert twice.value.code.name == "ALREADY_EXISTS"  # type: ignore[attr-defined]


async def runs_of(client: AsyncClient, count: int) -> list[Run]:
    """The policy's runs, once there are `count` (the triggers started them)."""
    while True:
        runs = [r async for r in client.retraining.runs("colours")]
        if len(runs) >= count:
            return runs
        await asyncio.sleep(0.1)


async def test_schedules_and_thresholds_start_runs(
    make_platform: Any,  # noqa: F811
    chat_model: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """Triggers checked every half second: a threshold of new examples starts one run (and the
    pending-examples gauge shows them), a schedule starts one run per period."""
    platform = await make_platform(
        inference={"base_model": "colours"},
        retraining={"poll_seconds": 0.2, "trigger_seconds": 0.5},
    )
    assert platform.server is not None
    async with AsyncClient(f"127.0.0.1:{platform.server.port}") as client:
        frozen = await frozen_set(client)
        champion = await upload_champion(client, chat_model, tmp_path, "first")
        await client.adapters.set_alias(ADAPTER, "prod", champion)
        await client.retraining.create_policy(
            policy(frozen, data={"minNewExamples": 3}, triggers={"onNewExamples": True})
        )
        await rate(client, ["a", "b", "c"])
        (run,) = await runs_of(client, 1)
        run = await client.retraining.wait(run.name)  # then the policy can go
        assert (run.trigger, run.trigger_detail) == (Run.TRIGGER_NEW_EXAMPLES, "3 new examples")
        labels = {"policy": "colours", "adapter": ADAPTER}
        assert (
            platform.registry.get_sample_value("tunefleet_retraining_min_new_examples", labels) == 3
        )

        await client.retraining.delete_policy("colours")
        await client.retraining.create_policy(policy(frozen, triggers={"scheduleSeconds": 1}))
        runs = await runs_of(client, 2)
        assert {r.trigger for r in runs} == {Run.TRIGGER_SCHEDULE}
        assert runs[0].create_time.ToDatetime() - runs[1].create_time.ToDatetime() >= timedelta(
            seconds=1
        )


async def test_a_restarted_service_exports_the_run_counts_of_its_policies_at_zero(
    make_platform: Any,  # noqa: F811
    chat_model: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """TunefleetRetrainingRunsFailing counts increase(): the first run to fail after a restart
    must move a series from 0, not create it at 1."""
    platform = await make_platform(inference={"base_model": "colours"})
    assert platform.server is not None
    async with AsyncClient(f"127.0.0.1:{platform.server.port}") as client:
        frozen = await frozen_set(client)
        champion = await upload_champion(client, chat_model, tmp_path, "first")
        await client.adapters.set_alias(ADAPTER, "prod", champion)
        await client.retraining.create_policy(policy(frozen))
    await platform.stop()
    await platform.start()
    for outcome in ("failed", "promoted", "gate_failed", "rolled_back", "cancelled"):
        labels = {"policy": "colours", "adapter": ADAPTER, "outcome": outcome}
        value = platform.registry.get_sample_value("tunefleet_retraining_runs_ended_total", labels)
        assert value == 0, outcome
    labels = {"adapter": ADAPTER}
    assert platform.registry.get_sample_value("tunefleet_retraining_promotions_total", labels) == 0


async def test_a_dpo_recipe_trains_on_the_preference_pairs_of_the_feedback(
    platform: Platform,
    client: AsyncClient,
    chat_model: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    """With DPO as the recipe's objective, a run trains on pairs (each correction preferred to
    the answer it corrects): its dataset is a preference dataset and its job a DPO job."""
    champion = await upload_champion(client, chat_model, tmp_path, "first")
    await client.adapters.set_alias(ADAPTER, "prod", champion)
    recipe: dict[str, Any] = {**RECIPE, "objective": "TRAINING_OBJECTIVE_DPO"}
    recipe["hyperparameters"] = {**recipe["hyperparameters"], "maxSteps": 4}
    await client.retraining.create_policy(policy(await frozen_set(client), recipe=recipe))
    rated = await rate(client, [f"r{i}" for i in range(10)])
    run = await client.retraining.wait((await client.retraining.start("colours")).name)
    assert run.state == Run.STATE_SUCCEEDED, run
    assert (run.preference_pairs, sorted(run.feedback)) == (10, sorted(rated))
    dataset = await client.datasets.get(run.train_dataset)
    assert dataset.kind == dataset_pb2.DATASET_KIND_PREFERENCE
    # The pairs differ only in a tag and the champion's answer: near duplicates may go.
    assert 1 <= dataset.record_count <= 10
    job = await client.training_jobs.get(run.training_job)
    assert job.objective == training_job_pb2.TRAINING_OBJECTIVE_DPO
