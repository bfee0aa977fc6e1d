"""The registry's work with real weights (transformers + PEFT, CPU or GPU): the smoke test that
an adapter changes its base model's logits, and merging an adapter into its base model."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

from tunefleet.core.loading import LOADING

PROBE_TOKENS = 16
DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}


def smoke_test(model_dir: Path, adapter_dir: Path) -> dict[str, Any]:
    """Compare the logits of the base model with and without the adapter on a probe input."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    with LOADING:
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        model = PeftModel.from_pretrained(base, str(adapter_dir))
    model.eval()
    vocab = int(base.config.vocab_size)
    probe = (torch.arange(PROBE_TOKENS) * 7919 % max(vocab - 1, 1) + 1).unsqueeze(0)
    with torch.no_grad():
        adapted = model(probe).logits
        with model.disable_adapter():
            plain = model(probe).logits
    change = float((adapted - plain).abs().max())
    if change <= 1e-6:
        return {
            "result": "RESULT_FAILED",
            "max_logit_change": change,
            "message": "logits are unchanged: the adapter's modules may not match the model, "
            "or its weights are zero",
        }
    return {"result": "RESULT_PASSED", "max_logit_change": change, "message": ""}


class QuantizedBase(ValueError):
    """The base model's weights are quantized: an adapter merged into them would be rounded to
    their grid (and a QLoRA adapter was trained against them in higher precision)."""


def merge(model_dir: Path, adapter_dir: Path, output_dir: Path, dtype: str) -> None:
    """Write the base model with the adapter merged in (safetensors, config, tokenizer), in full
    precision: a QLoRA adapter is merged into the unquantized base, never into 4-bit weights."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    config = json.loads((model_dir / "config.json").read_text())
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "quantized")
        raise QuantizedBase(
            f"the base model's weights are {method} ({model_dir.name}): merging into them would "
            "round the adapter away; register the unquantized base model under this name"
        )
    torch_dtype = getattr(torch, DTYPES[dtype]) if dtype else "auto"
    with LOADING:
        base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype)
        merged = PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(output_dir), safe_serialization=True)
    with contextlib.suppress(OSError, ValueError):  # a base model without a tokenizer
        AutoTokenizer.from_pretrained(str(model_dir)).save_pretrained(str(output_dir))
