"""Quantized exports of a full model, and their check against it.

Formats (ExportFormat's names):
- GGUF F16 / Q8_0 / Q4_0: one file for llama.cpp, Ollama and LM Studio (gguf_export.py);
- bitsandbytes NF4 / INT8: a transformers checkpoint whose linear layers are stored quantized
  (`quantization_config` in its config.json), which transformers and the PEFT engine load as they
  are; the tokenizer and chat template are copied beside it.

`check` reads the export back with transformers (an independent reader for GGUF, bitsandbytes'
own kernels for its formats) and compares its next-token predictions with the source's on fixed
prompts, tokenized by the model's own tokenizer and rendered with its own chat template: the
share of positions whose most likely next token is the same, and the mean KL divergence.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tunefleet.adapters import gguf_export
from tunefleet.core.loading import LOADING


@dataclass(frozen=True)
class Format:
    library: str  # "gguf" or "bitsandbytes"
    kind: str  # the GGUF type, or bitsandbytes' "nf4" / "int8"
    file: str = ""  # the one file of a GGUF export


FORMATS = {
    "EXPORT_FORMAT_GGUF_F16": Format("gguf", "f16", "model-f16.gguf"),
    "EXPORT_FORMAT_GGUF_Q8_0": Format("gguf", "q8_0", "model-q8_0.gguf"),
    "EXPORT_FORMAT_GGUF_Q4_0": Format("gguf", "q4_0", "model-q4_0.gguf"),
    "EXPORT_FORMAT_BNB_NF4": Format("bitsandbytes", "nf4"),
    "EXPORT_FORMAT_BNB_INT8": Format("bitsandbytes", "int8"),
}
# Files of a model folder that travel with a bitsandbytes export (its weights are written anew).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)
# The check's prompts: plain text and chat turns, general and task-like, short enough for small
# context windows.
CHECK_TEXTS = (
    "The quick brown fox jumps over the lazy dog, and then it runs into the forest.",
    "In 1969, the first people walked on the Moon. The mission was called Apollo 11.",
    "def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
    "Water boils at 100 degrees Celsius at sea level; at altitude it boils sooner.",
)
CHECK_CHATS = (
    "Name three primary colours.",
    "Extract the order as JSON: Kenji wants 4 bicycle lamps delivered to Berlin.",
    "Translate to French: Good morning, how are you?",
    "What is 12 times 7? Answer with the number only.",
)


@dataclass(frozen=True)
class Agreement:
    top1: float  # share of positions whose most likely next token is the source's
    kl: float  # mean KL(source || export) of the next-token distributions, in nats
    positions: int


def write(model_dir: Path, output_dir: Path, export_format: str) -> None:
    """Write the export of `model_dir` (a full model) into `output_dir`; gguf_export.ExportError
    for what the format cannot hold."""
    found = FORMATS[export_format]
    output_dir.mkdir(parents=True, exist_ok=True)
    if found.library == "gguf":
        gguf_export.export(model_dir, output_dir / found.file, found.kind)
        return
    from transformers import AutoModelForCausalLM

    with LOADING:
        model = AutoModelForCausalLM.from_pretrained(
            str(model_dir), quantization_config=bnb_config(found.kind), dtype="auto"
        )
    if not any("bitsandbytes" in type(m).__module__ for m in model.modules()):
        raise gguf_export.ExportError("bitsandbytes quantized no layer of this model")
    model.save_pretrained(str(output_dir), safe_serialization=True)
    for name in TOKENIZER_FILES:
        if (model_dir / name).exists():
            shutil.copy2(model_dir / name, output_dir / name)


def bnb_config(kind: str) -> Any:
    """bitsandbytes' NF4 (QLoRA's 4-bit type, double quantisation) or LLM.int8()."""
    import torch
    from transformers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)  # type: ignore[no-untyped-call]
    return BitsAndBytesConfig(  # type: ignore[no-untyped-call]
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )


def check(model_dir: Path, output_dir: Path, export_format: str) -> Agreement:
    """The export in `output_dir` against its source on the check's fixed prompts, as the
    source's tokenizer and chat template render them (each cut to the model's context)."""
    from transformers import AutoTokenizer

    config = json.loads((model_dir / "config.json").read_text())
    context = int(config.get("max_position_embeddings") or 2048)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    sequences = [tokenizer(text)["input_ids"] for text in CHECK_TEXTS]
    if tokenizer.chat_template:
        for prompt in CHECK_CHATS:
            rendered = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=False
            )
            sequences.append(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    ids = [list(map(int, s[:context])) for s in sequences if s]
    return agreement(model_dir, output_dir, ids, FORMATS[export_format].file)


def agreement(
    source_dir: Path, export_dir: Path, sequences: list[list[int]], gguf_file: str = ""
) -> Agreement:
    """The export's next-token predictions against its source's on `sequences` of token ids."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    extra = {"gguf_file": gguf_file} if gguf_file else {}
    with LOADING:
        source = AutoModelForCausalLM.from_pretrained(str(source_dir), dtype=torch.float32)
        exported = AutoModelForCausalLM.from_pretrained(
            str(export_dir), dtype=torch.float32, **extra
        )
    same = total = 0
    divergence = 0.0
    with torch.no_grad():
        for ids in sequences:
            batch = torch.tensor([ids])
            expected = source(batch).logits[0].float()
            found = exported(batch).logits[0].float()
            same += int((expected.argmax(-1) == found.argmax(-1)).sum())
            total += len(ids)
            log_p, log_q = F.log_softmax(expected, -1), F.log_softmax(found, -1)
            divergence += float((log_p.exp() * (log_p - log_q)).sum())
    return Agreement(same / max(total, 1), divergence / max(total, 1), total)
