"""The PEFT engine's prefix cache: prompts that begin like an earlier one reuse its keys and
values, and are answered exactly as plain transformers + PEFT answers them."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from tests.inference.conftest import PROMPTS, Served, reference
from tunefleet.inference.engine import AdapterFiles, GenerationRequest, Output, Sampling
from tunefleet.inference.peft_engine import PeftEngine, _PrefixCache

MAX_TOKENS = 8
FIRST = PROMPTS[1]
# The next turn of the same chat: it begins with the whole first prompt.
SECOND = FIRST + "Blue.<|end|><|user|>And the cat?<|end|><|assistant|>"


async def started(served: Served, **options: Any) -> PeftEngine:
    engine = PeftEngine(served.model, **options)
    await engine.start()
    for name in ("alpha", "delta"):  # a LoRA in the shared batch, a DoRA in a lane of its own
        await load(engine, name, served.adapters[name])
    return engine


async def load(engine: PeftEngine, name: str, path: Path) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    await engine.load_adapter(AdapterFiles(name, path, config))


@pytest.fixture
async def engine(served: Served) -> AsyncIterator[PeftEngine]:
    engine = await started(served)
    yield engine
    await engine.close()


async def ask(engine: PeftEngine, adapter: str | None, prompt: str) -> tuple[list[int], int]:
    """The greedy answer's token ids, and how many prompt tokens came from the cache."""
    ids = engine.tokenizer(prompt, add_special_tokens=False).input_ids
    request = GenerationRequest(ids, adapter, Sampling(max_tokens=MAX_TOKENS))
    outputs: list[Output] = [output async for output in engine.generate(request)]
    return [t for o in outputs for t in o.token_ids], sum(o.cached_tokens for o in outputs)


def length(engine: PeftEngine, prompt: str) -> int:
    return len(engine.tokenizer(prompt, add_special_tokens=False).input_ids)


@pytest.mark.parametrize("adapter", [None, "alpha", "delta"])
async def test_a_repeated_prompt_and_a_chat_s_next_turn_reuse_the_cache_and_answer_exactly(
    engine: PeftEngine, served: Served, adapter: str | None
) -> None:
    first = reference(served, adapter, FIRST, MAX_TOKENS)
    second = reference(served, adapter, SECOND, MAX_TOKENS)
    fed: list[int] = []  # tokens through the model, per pass
    engine.model.get_input_embeddings().register_forward_pre_hook(
        lambda module, inputs: fed.append(inputs[0].numel())
    )
    assert await ask(engine, adapter, FIRST) == (first, 0)
    assert fed == [length(engine, FIRST)] + [1] * (len(first) - 1)
    fed.clear()
    # Cached but for its last token: it joins the decoding batch, which feeds that token.
    assert await ask(engine, adapter, FIRST) == (first, length(engine, FIRST) - 1)
    assert fed == [1] * len(first)
    fed.clear()
    # The next turn: the first prompt's tokens are reused, the rest is prefilled.
    assert await ask(engine, adapter, SECOND) == (second, length(engine, FIRST))
    assert fed[0] == length(engine, SECOND) - length(engine, FIRST)


async def test_keys_and_values_are_never_shared_between_adapters(
    engine: PeftEngine, served: Served
) -> None:
    await ask(engine, "alpha", FIRST)
    for adapter in (None, "delta"):
        assert await ask(engine, adapter, FIRST) == (reference(served, adapter, FIRST, 8), 0)


async def test_an_unloaded_adapter_s_entries_go_with_it(engine: PeftEngine, served: Served) -> None:
    """Serving names never name other weights, but even if one did after an unload, the old
    keys and values could not answer for it."""
    await ask(engine, "alpha", FIRST)
    await engine.unload_adapter("alpha")
    await load(engine, "alpha", served.adapters["beta"])  # other weights under the same name
    assert await ask(engine, "alpha", FIRST) == (reference(served, "beta", FIRST, 8), 0)


async def test_concurrent_prompts_with_and_without_cached_beginnings_answer_exactly(
    engine: PeftEngine, served: Served
) -> None:
    for adapter in (None, "alpha", "delta"):
        await ask(engine, adapter, FIRST)
    cases = [(a, p) for a in (None, "alpha", "delta") for p in (FIRST, SECOND, PROMPTS[0])] * 2
    results = await asyncio.gather(*(ask(engine, a, p) for a, p in cases))
    for (adapter, prompt), (answer, _) in zip(cases, results, strict=True):
        assert answer == reference(served, adapter, prompt, MAX_TOKENS), (adapter, prompt)
    assert sum(cached for _, cached in results) > 0


async def test_no_reuse_when_the_cache_is_off(served: Served) -> None:
    engine = await started(served, prefix_cache_mb=0)
    try:
        for _ in range(2):
            assert await ask(engine, "alpha", FIRST) == (
                reference(served, "alpha", FIRST, MAX_TOKENS),
                0,
            )
        assert engine.cached_tokens == 0
    finally:
        await engine.close()


def prompt_cache(ids: list[int]) -> Any:
    """A one-row, two-layer KV cache of `ids` (the values are the token ids)."""
    keys = torch.tensor(ids, dtype=torch.float32).reshape(1, 1, len(ids), 1)
    return SimpleNamespace(layers=[SimpleNamespace(keys=keys, values=keys.clone())] * 2)


def test_the_least_recently_used_entries_go_beyond_the_capacity() -> None:
    prompts = [[1, 2, 3, 4], [1, 2, 5, 6], [7, 8, 9, 10]]
    cache = _PrefixCache(capacity=2 * 64)  # two prompts of 4 tokens: 2 layers x K and V x 16 B
    for ids in prompts[:2]:
        cache.add(None, ids, prompt_cache(ids), 0, 0)
    assert cache.find(None, [1, 2, 3, 9])[0] == 3
    cached, layers = cache.find(None, [1, 2, 5, 6])  # the whole prompt: all but its last token
    assert cached == 3
    assert layers[0][0].flatten().tolist() == [1, 2, 5]
    assert cache.find("alpha", [1, 2, 3, 9]) == (0, [])  # another adapter's prompts
    cache.find(None, [1, 2, 3, 4])  # used last: the other one goes first
    cache.add(None, prompts[2], prompt_cache(prompts[2]), 0, 0)
    assert cache.size == 2 * 64
    assert cache.find(None, [1, 2, 5, 6])[0] == 2  # only the shared [1, 2] is left
    cache.drop("alpha")
    assert cache.find(None, [7, 8, 9, 10])[0] == 3
    cache.add("alpha", [1, 2, 3], prompt_cache([1, 2, 3]), 0, 0)
    cache.drop("alpha")
    assert cache.find("alpha", [1, 2, 3]) == (0, [])
    big = list(range(100))
    cache.add(None, big, prompt_cache(big), 0, 0)  # larger than the whole cache: not kept
    assert cache.find(None, big)[0] == 0
    assert cache.size == 64
