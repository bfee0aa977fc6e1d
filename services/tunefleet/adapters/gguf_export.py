"""GGUF export of a merged Llama-family model (the format llama.cpp, Ollama and LM Studio run),
written in-process with the `gguf` package, llama.cpp's own writer.

Everything in the file comes from the model's own folder: the hyperparameters from config.json,
the vocabulary, merges and special tokens from tokenizer.json and tokenizer_config.json, the chat
template from chat_template.jinja (or tokenizer_config.json). Tensors get llama.cpp's names; the
query and key projections are permuted from the Hugging Face layout (rotary halves) back to
llama.cpp's interleaved one, as llama.cpp's own converter does. 2-D weights are stored as F16,
Q8_0 or Q4_0 (blocks of 32 along each row); norms stay F32.

exports.py checks the file against its source.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

FORMATS = ("f16", "q8_0", "q4_0")
LLAMA_ARCHITECTURES = {"LlamaForCausalLM"}
# Hugging Face name (within a layer) -> llama.cpp name.
LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


class ExportError(ValueError):
    """The model cannot be exported in this format; the message says why."""


def permute(weight: Any, heads: int) -> Any:
    """Hugging Face's q/k rows (each head's rotary halves one after the other) to llama.cpp's
    (the halves interleaved)."""
    rows = weight.shape[0]
    return (
        weight.reshape(heads, 2, rows // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def export(model_dir: Path, output: Path, kind: str, *, permute_qk: bool = True) -> None:
    """Write `model_dir` (a merged Llama-family model) to `output` as GGUF of `kind`.
    `permute_qk=False` writes a broken file on purpose (the check must refuse it)."""
    import gguf
    import numpy as np
    import torch
    from safetensors import safe_open

    if kind not in FORMATS:
        raise ExportError(f"format: {kind!r} is not one of {', '.join(FORMATS)}")
    config = json.loads((model_dir / "config.json").read_text())
    if not set(config.get("architectures") or []) & LLAMA_ARCHITECTURES:
        raise ExportError(
            f"{config.get('architectures')}: only the Llama family is exported to GGUF so far"
        )
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads")
    kv_heads = kv_heads or heads
    hidden = config["hidden_size"]
    head_dim = config.get("head_dim") or hidden // heads
    quantized = {
        "f16": gguf.GGMLQuantizationType.F16,
        "q8_0": gguf.GGMLQuantizationType.Q8_0,
        "q4_0": gguf.GGMLQuantizationType.Q4_0,
    }[kind]
    writer = gguf.GGUFWriter(str(output), "llama")
    writer.add_name(config.get("_name_or_path") or model_dir.name)
    writer.add_context_length(config.get("max_position_embeddings", 2048))
    writer.add_embedding_length(hidden)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_rope_dimension_count(head_dim)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    writer.add_rope_freq_base(_rope_theta(config))
    writer.add_vocab_size(config["vocab_size"])
    writer.add_file_type(
        {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}.get(
            kind, gguf.LlamaFileType.MOSTLY_Q4_0
        )
    )
    _add_tokenizer(writer, model_dir, config)

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{model_dir}: no safetensors weights")
    tied = bool(config.get("tie_word_embeddings"))
    for file in files:
        with safe_open(str(file), framework="pt") as weights:
            for name in weights.keys():  # noqa: SIM118 (safe_open has no __iter__)
                target = _gguf_name(name)
                if target is None or (tied and name == "lm_head.weight"):
                    continue
                tensor = weights.get_tensor(name).to(torch.float32).numpy()
                if permute_qk and target.endswith("attn_q.weight"):
                    tensor = permute(tensor, heads)
                elif permute_qk and target.endswith("attn_k.weight"):
                    tensor = permute(tensor, kv_heads)
                if tensor.ndim == 1:
                    writer.add_tensor(target, tensor.astype(np.float32))
                elif quantized == gguf.GGMLQuantizationType.F16:
                    writer.add_tensor(target, tensor.astype(np.float16))
                else:
                    if tensor.shape[-1] % 32:
                        raise ExportError(
                            f"{name}: rows of {tensor.shape[-1]} values do not split into "
                            f"{kind} blocks of 32"
                        )
                    packed = gguf.quants.quantize(tensor, quantized)
                    writer.add_tensor(target, packed, raw_shape=packed.shape, raw_dtype=quantized)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _rope_theta(config: dict[str, Any]) -> float:
    """The rotary base (transformers 5 keeps it in `rope_parameters`); scaled rotary embeddings
    (llama3, yarn, ...) are refused rather than written as plain ones."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = rope.get("rope_type") or rope.get("type") or "default"
    if kind != "default":
        raise ExportError(f"rope_parameters: {kind!r} rotary scaling is not exported yet")
    return float(rope.get("rope_theta") or config.get("rope_theta") or 10000.0)


def _gguf_name(name: str) -> str | None:
    if name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[name]
    parts = name.split(".", 3)  # model.layers.{i}.rest
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in LAYER_TENSORS:
        return f"blk.{parts[2]}.{LAYER_TENSORS[parts[3]]}"
    if name.endswith("rotary_emb.inv_freq"):
        return None  # recomputed from the rope settings
    raise ExportError(f"{name}: no GGUF name for this tensor")


def _add_tokenizer(writer: Any, model_dir: Path, config: dict[str, Any]) -> None:
    """The byte-level BPE vocabulary ("gpt2" in llama.cpp's words), its merges, special tokens
    and chat template, from the model's own tokenizer files."""
    import gguf

    document = json.loads((model_dir / "tokenizer.json").read_text())
    model = document["model"]
    if model.get("type") != "BPE":
        raise ExportError(f"tokenizer.json: a {model.get('type')} tokenizer is not exported yet")
    vocabulary: dict[str, int] = dict(model["vocab"])
    special = {token["content"]: token["id"] for token in document.get("added_tokens", [])}
    vocabulary.update(special)
    size = max(config["vocab_size"], max(vocabulary.values()) + 1)
    tokens = [f"[PAD{i}]" for i in range(size)]
    types = [gguf.TokenType.UNUSED] * size
    for token, index in vocabulary.items():
        tokens[index] = token
        types[index] = gguf.TokenType.CONTROL if token in special else gguf.TokenType.NORMAL
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_token_merges(merges)
    settings = {}
    tokenizer_config = model_dir / "tokenizer_config.json"
    if tokenizer_config.exists():
        settings = json.loads(tokenizer_config.read_text())

    def token_id(key: str) -> int | None:
        value = settings.get(key)
        content = value.get("content") if isinstance(value, dict) else value
        return vocabulary.get(content) if content else None

    for key, add in (
        ("bos_token", writer.add_bos_token_id),
        ("eos_token", writer.add_eos_token_id),
        ("pad_token", writer.add_pad_token_id),
        ("unk_token", writer.add_unk_token_id),
    ):
        found = token_id(key)
        if found is None and key in ("bos_token", "eos_token"):
            found = config.get(f"{key.removesuffix('_token')}_token_id")
        if isinstance(found, int):
            add(found)
    writer.add_add_bos_token(bool(settings.get("add_bos_token", False)))
    template_file = model_dir / "chat_template.jinja"
    template = (
        template_file.read_text() if template_file.exists() else settings.get("chat_template")
    )
    if template:
        writer.add_chat_template(template)
