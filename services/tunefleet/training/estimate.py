"""How much GPU memory a training job needs, estimated before it is queued.

Per GPU (data parallel: every GPU holds the whole model and its optimizer state):

- model state per base-model parameter: full fine-tuning 16 bytes (16-bit weights and
  gradients, fp32 master weights, two fp32 Adam moments; fp32 training is 16 as well); LoRA and
  DoRA 2 (frozen 16-bit weights; 4 in fp32); QLoRA 0.5 (NF4 weights, double-quantised);
- the adapter's own parameters, trained like full fine-tuning: 16 bytes each;
- activations kept for the backward pass: 34·s·b·h·L bytes for 16-bit training (Korthikanti et
  al., 2022, "Reducing Activation Recomputation in Large Transformer Models", without
  recomputation, with a fused attention kernel such as PyTorch's SDPA, which never stores the
  s x s attention scores), doubled for fp32, plus the fp32 logits and their gradient, 8·b·s·V;
- a fixed 1 GiB for the CUDA context and allocator slack.

Sharded across N GPUs (FSDP), each holds 1/N of the model state, and for the layer that runs
(and the next, prefetched) the whole of its weights: two layers' worth.

The parameter count and layer shapes come from the model's config.json, built on PyTorch's meta
device (no weights are read).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from tunefleet.core.loading import LOADING

GiB = 1024**3
OVERHEAD_BYTES = GiB
ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")


@dataclass(frozen=True)
class ModelShape:
    parameters: int
    hidden_size: int
    layers: int
    vocab_size: int
    linears: dict[str, tuple[int, int]]  # module name -> (in_features, out_features)


@dataclass(frozen=True)
class Estimate:
    model_parameters: int
    gpu_memory_bytes: int
    explanation: str


@functools.lru_cache(maxsize=32)
def model_shape(model_dir: Path) -> ModelShape:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    with LOADING, torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    text = config.get_text_config()
    linears = {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear)
    }
    return ModelShape(
        parameters=sum(p.numel() for p in model.parameters()),
        hidden_size=int(text.hidden_size),
        layers=int(text.num_hidden_layers),
        vocab_size=int(text.vocab_size),
        linears=linears,
    )


def adapter_parameters(shape: ModelShape, rank: int, targets: list[str] | str, dora: bool) -> int:
    """LoRA parameters: rank x (in + out) per adapted linear layer (DoRA adds a magnitude per
    output feature). `targets` is "all-linear", "attention" or module-name suffixes."""
    total = 0
    for name, (fan_in, fan_out) in shape.linears.items():
        leaf = name.rsplit(".", 1)[-1]
        if targets == "all-linear":
            chosen = leaf != "lm_head"
        elif targets == "attention":
            chosen = leaf in ATTENTION_MODULES
        else:
            chosen = leaf in targets
        if chosen:
            total += rank * (fan_in + fan_out) + (fan_out if dora else 0)
    return total


def estimate(
    shape: ModelShape,
    method: str,
    precision: str,
    rank: int,
    targets: list[str] | str,
    micro_batch_size: int,
    sequence_length: int,
    shards: int = 1,
) -> Estimate:
    fp32 = precision == "fp32"
    per_parameter = {"full": 16.0, "lora": 4.0 if fp32 else 2.0, "qlora": 0.5}
    per_parameter["dora"] = per_parameter["lora"]
    adapter = 0 if method == "full" else adapter_parameters(shape, rank, targets, method == "dora")
    state = int(shape.parameters * per_parameter[method]) + 16 * adapter
    gathered = 0
    if shards > 1:
        weight_bytes = 0.5 if method == "qlora" else 4.0 if fp32 else 2.0
        layer = shape.parameters / max(shape.layers, 1) * weight_bytes
        state, gathered = state // shards, int(2 * layer)
    b, s, h, layers = micro_batch_size, sequence_length, shape.hidden_size, shape.layers
    activations = 34 * s * b * h * layers * (2 if fp32 else 1)
    logits = 8 * b * s * shape.vocab_size
    total = state + gathered + activations + logits + OVERHEAD_BYTES
    explanation = (
        f"{shape.parameters / 1e9:.2f}B parameters x {per_parameter[method]:g} bytes ({method})"
        + (f" + {adapter / 1e6:.1f}M adapter parameters x 16 bytes" if adapter else "")
        + (f", sharded across {shards} GPUs" if shards > 1 else "")
        + f" = {state / GiB:.1f} GiB"
        + (f"; two gathered layers {gathered / GiB:.1f} GiB" if gathered else "")
        + f"; activations for {b} x {s} tokens {activations / GiB:.1f} GiB"
        f"; logits {logits / GiB:.1f} GiB; CUDA overhead 1 GiB: about {total / GiB:.1f} GiB per GPU"
    )
    return Estimate(shape.parameters, total, explanation)
