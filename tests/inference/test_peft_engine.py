"""The PEFT engine against plain transformers + PEFT."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.inference.conftest import ADAPTERS, PROMPTS, Served, reference
from tunefleet.inference.engine import AdapterFiles, Finish, GenerationRequest, Output, Sampling
from tunefleet.inference.peft_engine import PeftEngine, _similar_lengths

MAX_TOKENS = 12


@pytest.fixture
async def engine(served: Served) -> AsyncIterator[PeftEngine]:
    engine = PeftEngine(served.model)
    await engine.start()
    for name, path in served.adapters.items():
        config = json.loads((path / "adapter_config.json").read_text())
        await engine.load_adapter(AdapterFiles(name, path, config))
    yield engine
    await engine.close()


async def run(
    engine: PeftEngine, adapter: str | None, prompt: str, **sampling: Any
) -> list[Output]:
    ids = engine.tokenizer(prompt, add_special_tokens=False).input_ids
    options = {"max_tokens": MAX_TOKENS, **sampling}
    request = GenerationRequest(ids, adapter, Sampling(**options))
    return [output async for output in engine.generate(request)]


def tokens(outputs: list[Output]) -> list[int]:
    return [token for output in outputs for token in output.token_ids]


async def test_concurrent_mixed_batches_equal_plain_peft(
    engine: PeftEngine, served: Served
) -> None:
    cases = [(adapter, prompt) for adapter in [None, *ADAPTERS] for prompt in PROMPTS]
    results = await asyncio.gather(*(run(engine, a, p) for a, p in cases))
    seen = set()
    for (adapter, prompt), outputs in zip(cases, results, strict=True):
        expected = reference(served, adapter, prompt, MAX_TOKENS)
        assert tokens(outputs) == expected, (adapter, prompt)
        assert outputs[-1].finish is not None
        assert outputs[-1].completion_tokens == len(expected)
        text = "".join(o.text for o in outputs)
        assert text == engine.tokenizer.decode(expected, skip_special_tokens=True)
        seen.add(tuple(expected))
    assert len(seen) > len(PROMPTS)  # the adapters change the output


def test_prompts_prefilled_together_are_grouped_so_padding_stays_small() -> None:
    """Prompts of 21, 23, 31 and 43 tokens: prefilled in one pass, padding would add 46% to
    their 472 tokens (16 prompts); grouped by length, each group's padding adds at most 25%."""
    from types import SimpleNamespace

    rows: list[Any] = [SimpleNamespace(prompt=n) for n in [43, 21, 31, 23] * 4]
    groups = _similar_lengths(rows)
    assert [[r.prompt for r in g] for g in groups] == [[21] * 4 + [23] * 4, [31] * 4, [43] * 4]
    for group in groups:
        assert len(group) * max(r.prompt for r in group) <= 1.25 * sum(r.prompt for r in group)
    assert _similar_lengths([]) == []


async def test_stop_strings_and_token_limits(engine: PeftEngine) -> None:
    full = await run(engine, "alpha", PROMPTS[0], max_tokens=8)
    text = "".join(o.text for o in full)
    assert full[-1].finish in (Finish.LENGTH, Finish.STOP)
    if full[-1].finish == Finish.LENGTH:
        assert full[-1].completion_tokens == 8
    cut = text[len(text) // 2 : len(text) // 2 + 2]
    if cut.strip():
        stopped = await run(engine, "alpha", PROMPTS[0], max_tokens=8, stop=(cut,))
        assert stopped[-1].finish == Finish.STOP
        assert "".join(o.text for o in stopped) == text[: text.find(cut)]


async def test_seeded_sampling_repeats(engine: PeftEngine) -> None:
    first = await run(engine, "beta", PROMPTS[1], temperature=1.0, top_p=0.9, seed=7)
    again = await run(engine, "beta", PROMPTS[1], temperature=1.0, top_p=0.9, seed=7)
    assert tokens(first) == tokens(again)


async def test_unloading_every_adapter_leaves_the_base_model(
    engine: PeftEngine, served: Served
) -> None:
    for name in ADAPTERS:
        await engine.unload_adapter(name)
    outputs = await run(engine, None, PROMPTS[0])
    assert tokens(outputs) == reference(served, None, PROMPTS[0], MAX_TOKENS)
    path = served.adapters["alpha"]
    config = json.loads((path / "adapter_config.json").read_text())
    await engine.load_adapter(AdapterFiles("alpha", path, config))
    outputs = await run(engine, "alpha", PROMPTS[0])
    assert tokens(outputs) == reference(served, "alpha", PROMPTS[0], MAX_TOKENS)


async def until(condition: Any) -> None:
    """Wait for a state of the engine (it changes on its own thread)."""
    for _ in range(6000):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the engine never reached the state waited for")


async def test_a_pass_whose_rows_were_all_cancelled_stops_at_the_next_layer(
    tmp_path: Path,
) -> None:
    """A client cancels while a 30,000-token prompt's chunk is inside the model: the pass is
    abandoned before the next decoder layer (not run to its end), and the engine serves the next
    request exactly as before."""
    import threading

    from tunefleet.demo.models import build_chat_model

    model = build_chat_model(tmp_path / "deep", ["a long context"], max_positions=32768, layers=6)
    engine = PeftEngine(model, prefill_chunk=4096)
    await engine.start()
    inside, release = threading.Event(), threading.Event()
    layers = engine.model.model.layers

    def hold(module: Any, inputs: Any) -> None:  # on the engine's thread, in layer 2
        if inputs[0].shape[1] == 4096 and not release.is_set():
            inside.set()
            release.wait(60)

    hook = layers[2].register_forward_pre_hook(hold)
    passed: list[int] = []
    for index, layer in enumerate(layers):
        layer.register_forward_pre_hook(lambda *_, index=index: passed.append(index))
    try:
        small = GenerationRequest([5, 6, 7], None, Sampling(max_tokens=4))
        before = [o.token_ids async for o in engine.generate(small)]
        long = GenerationRequest([5 + i % 40 for i in range(30_000)], None, Sampling(max_tokens=4))

        async def drain() -> None:
            async for _ in engine.generate(long):
                pass

        task = asyncio.create_task(drain())
        await asyncio.to_thread(inside.wait, 60)
        passed.clear()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task  # its generator's cleanup marked the request cancelled
        release.set()
        await until(lambda: engine.abandoned == 1)
        assert passed == [2]  # layer 2 ran (it was held there); layers 3 to 5 never did
        hook.remove()
        after = [o.token_ids async for o in engine.generate(small)]
        assert after == before
        await until(lambda: not any(lane.busy for lane in engine._lanes.values()))
        assert engine.abandoned == 1
    finally:
        release.set()
        await engine.close()


async def test_a_cancelled_long_prefill_stops_within_one_step(tmp_path: Path) -> None:
    """A 30,000-token prompt is prefilled in chunks; the client leaves after the first ones:
    the engine does at most one more step for it, and a small request sent then needs no more
    steps than on an idle engine."""
    from tunefleet.demo.models import build_chat_model

    model = build_chat_model(tmp_path / "long", ["a long context"], max_positions=32768)
    engine = PeftEngine(model, prefill_chunk=512)
    await engine.start()
    try:
        small = GenerationRequest([5, 6, 7], None, Sampling(max_tokens=4))

        async def steps_of(request: GenerationRequest) -> int:
            before = engine.steps
            async for _ in engine.generate(request):
                pass
            return engine.steps - before

        idle = await steps_of(small)
        long = GenerationRequest([5 + i % 40 for i in range(30_000)], None, Sampling(max_tokens=4))
        task = asyncio.create_task(steps_of(long))
        await until(lambda: engine.steps >= idle + 3)
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        left = engine.steps  # the client is gone (its generator's cleanup has run)
        assert left < idle + 30_000 // 512  # it was cancelled mid-prefill
        after = await steps_of(small)
        assert after <= idle + 1
        await until(lambda: not any(lane.busy for lane in engine._lanes.values()))
        assert engine.steps - left <= 1 + after  # one step for the long prompt, at most
    finally:
        await engine.close()
