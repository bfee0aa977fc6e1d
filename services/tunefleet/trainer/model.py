"""Loading the model to train: LoRA, DoRA, QLoRA (NF4 with double quantisation) or full."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from tunefleet.trainer.spec import TrainerSpec

ATTENTION_HINTS = ("attn", "attention")


def compute_dtype(spec: TrainerSpec) -> Any:
    import torch

    precision = spec.hyperparameters.precision
    if precision == "auto":
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def load_model(spec: TrainerSpec, device: str = "cpu") -> Any:
    """The model on `device` with its trainable parameters set up for the spec's method."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = compute_dtype(spec)
    path = str(spec.model_dir)
    if spec.method == "qlora":
        from peft import prepare_model_for_kbit_training

        model = AutoModelForCausalLM.from_pretrained(
            path, quantization_config=quantization_config(spec), device_map={"": device}
        )
        model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            model, use_gradient_checkpointing=torch.cuda.is_available()
        )
        keep_4bit_layers_trainable(model)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
        model = model.to(torch.device(device))  # type: ignore[arg-type]
    if spec.method == "full":
        model.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    lora = spec.lora
    targets: Any = lora.target_modules
    if targets == "attention":
        targets = attention_modules(model)
    config = LoraConfig(
        r=lora.rank,
        lora_alpha=lora.scaling_alpha,  # type: ignore[arg-type]
        lora_dropout=lora.dropout,
        use_rslora=lora.use_rslora,
        use_dora=spec.method == "dora",
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    return get_peft_model(model, config)


def quantization_config(spec: TrainerSpec) -> Any:
    """QLoRA's 4-bit NF4 with double quantisation. Sharded (FSDP), the packed 4-bit weights are
    stored as bfloat16 elements: FSDP shards and gathers floating-point tensors only."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16,
        bnb_4bit_quant_storage=torch.bfloat16 if spec.fsdp else torch.uint8,
    )


@contextlib.contextmanager
def adapters_disabled(model: Any) -> Iterator[None]:
    """The base model's outputs for a while: every PEFT layer passes its adapter by (a full
    model has none). PEFT's own `disable_adapter` also turns the adapter's requires_grad off
    and on again, which reaches only the parameters a module holds at that moment: under FSDP
    the sharded ones then stay frozen and their gradients are never reduced. This sets the flag
    the layers read, and nothing else."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    before = [layer._disable_adapters for layer in layers]
    for layer in layers:
        layer._disable_adapters = True
    try:
        yield
    finally:
        for layer, disabled in zip(layers, before, strict=True):
            layer._disable_adapters = disabled


def keep_4bit_layers_trainable(model: Any) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for inference on CPU.

    On a CPU with AVX512-BF16, bitsandbytes' `Linear4bit.forward` outside training mode (every
    evaluation) repacks the weights in place for its fast inference kernel, and from then on
    every forward pass, training ones too, goes through `gemv_4bit`, which has no backward: the
    LoRA gradients come out wrong (a median 90% off) while the loss still falls. The layers'
    flag turns that path off; evaluation then uses the same kernel as training.
    """
    from bitsandbytes.nn.modules import Linear4bit

    for module in model.modules():
        if isinstance(module, Linear4bit):
            module.support_avx512bf16_for_cpu = False


def attention_modules(model: Any) -> list[str]:
    """Names (last part) of the linear layers inside attention blocks."""
    import torch

    names = set()
    for name, module in model.named_modules():
        parent = name.rsplit(".", 1)[0]
        if isinstance(module, torch.nn.Linear) and any(h in parent for h in ATTENTION_HINTS):
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)
