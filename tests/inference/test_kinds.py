"""Every kind of adapter the registry accepts is either served exactly (equal to plain PEFT,
token for token) or refused by the engine for the reason the registry reported."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import grpc
import pytest

from tests.helpers import error_info
from tests.inference.conftest import KINDS, PROMPTS, Served, Serving, reference, summary
from tunefleet.core import kinds as rules
from tunefleet.inference.engine import AdapterFiles, GenerationRequest, Sampling
from tunefleet.inference.peft_engine import PeftEngine
from tunefleet.v1 import adapter_service_pb2

MAX_TOKENS = 12


async def test_every_kind_is_served_exactly_or_refused_with_the_registrys_reason(
    serving: Serving, served: Served, kinds: dict[str, Path]
) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(served.model))
    versions = {
        name: await serving.register(name.replace("_", "-"), path) for name, path in kinds.items()
    }
    reports = {}
    for name, version in versions.items():
        row = await serving.adapters.GetAdapterVersion(
            adapter_service_pb2.GetAdapterVersionRequest(name=version)
        )
        (peft,) = [c for c in row.compatibility if c.engine == 2]  # SERVING_ENGINE_PEFT
        reports[name] = peft
    # The engine refuses what the registry says it cannot serve, and nothing else.
    assert {n for n, r in reports.items() if not r.compatible} == {"bias"}

    cases = [(name, prompt) for name in versions for prompt in PROMPTS]

    async def ask(name: str, prompt: str) -> Any:
        try:
            return await serving.generate(versions[name], prompt, max_tokens=MAX_TOKENS)
        except grpc.aio.AioRpcError as error:
            return error

    answers: list[Any] = []
    loaded = 3 * len(PROMPTS)  # the server keeps 3 versions loaded: 3 kinds at a time
    for group in range(0, len(cases), loaded):
        answers += await asyncio.gather(*(ask(n, p) for n, p in cases[group : group + loaded]))
    outputs = set()
    for (name, prompt), answer in zip(cases, answers, strict=True):
        if not reports[name].compatible:
            assert isinstance(answer, grpc.aio.AioRpcError), name
            assert answer.code() == grpc.StatusCode.FAILED_PRECONDITION
            info = error_info(answer)
            assert info is not None and info.reason == "ADAPTER_NOT_SERVABLE"
            assert reports[name].reasons[0] in (answer.details() or "")
            continue
        assert not isinstance(answer, grpc.aio.AioRpcError), (name, answer)
        expected = reference(served, kinds[name], prompt, MAX_TOKENS)
        assert answer.text == tokenizer.decode(expected, skip_special_tokens=True), name
        outputs.add(answer.text)
    assert len(outputs) > len(PROMPTS)  # the kinds differ from each other


async def test_the_peft_engine_serves_kinds_outside_its_stacked_path_through_peft(
    served: Served, kinds: dict[str, Path]
) -> None:
    """The engine alone, with every servable kind loaded at once: the kinds its stacked path
    does not cover get lanes of their own, the rest share the mixed batch."""
    engine = PeftEngine(served.model)
    await engine.start()
    try:
        servable = {}
        for name, path in kinds.items():
            config = summary(served.model, path)
            if rules.peft_refusal(config) is None:
                await engine.load_adapter(AdapterFiles(name, path, config))
                servable[name] = path
        assert engine._own == {"dora", "lora_bias", "trained_head", "embedding"}

        async def run(name: str | None, prompt: str) -> list[int]:
            ids = engine.tokenizer(prompt, add_special_tokens=False).input_ids
            request = GenerationRequest(ids, name, Sampling(max_tokens=MAX_TOKENS))
            return [t async for output in engine.generate(request) for t in output.token_ids]

        cases = [(n, p) for n in [None, *servable] for p in PROMPTS]
        results = await asyncio.gather(*(run(n, p) for n, p in cases))
        for (kind, prompt), tokens in zip(cases, results, strict=True):
            adapter = servable[kind] if kind else None
            assert tokens == reference(served, adapter, prompt, MAX_TOKENS), kind
    finally:
        await engine.close()


@pytest.mark.parametrize("name", sorted(KINDS))
def test_the_registrys_report_is_the_engines_rule(name: str) -> None:
    """The registry's summary of each kind gives the same verdict as the rules the engines
    apply (the summaries are checked through the service in the test above)."""
    options = KINDS[name]
    summary = {
        "peft_type": "LORA",
        "rank": options["r"],
        "max_rank": options["r"],
        "use_dora": bool(options.get("use_dora")),
        "bias": options.get("bias", "none"),
        "lora_bias": bool(options.get("lora_bias")),
        "modules_to_save": options.get("modules_to_save", []),
        "target_kinds": ["Embedding", "Linear"] if name == "embedding" else ["Linear"],
    }
    vllm = rules.vllm_refusal(summary, 64)
    assert (vllm is None) == (name in {"q_v", "all_linear", "rslora"})
    assert (rules.peft_refusal(summary) is None) == (name != "bias")
