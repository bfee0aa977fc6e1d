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
