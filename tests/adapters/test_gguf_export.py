"""GGUF export (issue 23's first part): the file written from a model's own folder, read back by
independent readers (the `gguf` package's reader, transformers' GGUF loader), its predictions
compared with the source's, its tokenizer and chat template with the source tokenizer's."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from tunefleet.adapters.exports import agreement
from tunefleet.adapters.gguf_export import ExportError, export

LAYER_PARTS = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm"]
LAYER_PARTS += ["ffn_gate", "ffn_up", "ffn_down"]
CONVERSATION = [
    {"role": "system", "content": "Answer with one colour."},
    {"role": "user", "content": "Which colour goes with the cat?"},
    {"role": "assistant", "content": "Colour: red. Done."},
    {"role": "user", "content": "And the owl?"},
]


@pytest.fixture(scope="module")
def model(gguf_source: Path) -> Path:
    return gguf_source


def sequences(count: int = 8, length: int = 24) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(6, 290) for _ in range(length)] for _ in range(count)]


@pytest.fixture(scope="module")
def exported(model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    files = {}
    for kind in ("f16", "q8_0", "q4_0"):
        files[kind] = tmp_path_factory.mktemp(kind) / "model.gguf"
        export(model, files[kind], kind)
    files["unpermuted"] = tmp_path_factory.mktemp("unpermuted") / "model.gguf"
    export(model, files["unpermuted"], "q8_0", permute_qk=False)
    return files


def test_the_file_holds_llama_cpp_s_names_types_and_the_model_s_settings(
    model: Path, exported: dict[str, Path]
) -> None:
    import json

    import numpy as np
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize
    from safetensors.torch import load_file

    config = json.loads((model / "config.json").read_text())
    reader = GGUFReader(str(exported["q8_0"]))
    fields = {name: reader.fields[name] for name in reader.fields}

    def scalar(name: str) -> object:
        field = fields[name]
        return field.parts[field.data[0]][0]

    assert scalar("llama.block_count") == config["num_hidden_layers"]
    assert scalar("llama.attention.head_count") == config["num_attention_heads"]
    assert scalar("llama.attention.head_count_kv") == config["num_key_value_heads"]
    assert scalar("llama.embedding_length") == config["hidden_size"]
    assert scalar("llama.rope.freq_base") == pytest.approx(500.0)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    layers = config["num_hidden_layers"]
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{part}.weight" for i in range(layers) for part in LAYER_PARTS
    }
    assert set(tensors) == expected
    assert tensors["blk.0.attn_v.weight"].tensor_type == GGMLQuantizationType.Q8_0
    assert tensors["blk.0.attn_norm.weight"].tensor_type == GGMLQuantizationType.F32
    # Q8_0 keeps each block of 32 within a step of its scale (1/127 of its largest value; the
    # scale itself is stored in float16).
    source = load_file(str(model / "model.safetensors"))["model.layers.0.self_attn.v_proj.weight"]
    stored = tensors["blk.0.attn_v.weight"]
    values = dequantize(stored.data, stored.tensor_type).reshape(source.shape)
    blocks = source.numpy().reshape(-1, 32)
    step = np.abs(blocks).max(axis=1, keepdims=True) / 127
    assert (np.abs(values.reshape(-1, 32) - blocks) <= step).all()


def test_exports_agree_with_the_source_as_their_precision_allows(
    model: Path, exported: dict[str, Path]
) -> None:
    found = {
        kind: agreement(model, path.parent, sequences(), path.name)
        for kind, path in exported.items()
    }
    assert found["f16"].top1 == 1.0 and found["f16"].kl < 1e-6
    assert found["q8_0"].top1 >= 0.95 and found["q8_0"].kl < 1e-4
    assert found["q4_0"].top1 < found["q8_0"].top1 and found["q4_0"].kl > found["q8_0"].kl
    # The q/k rows left in Hugging Face's layout: a file that loads and answers, wrongly.
    assert found["unpermuted"].top1 < 0.8
    assert found["unpermuted"].kl > 10 * found["q8_0"].kl


def test_the_tokenizer_and_chat_template_inside_render_as_the_model_s_own(
    model: Path, exported: dict[str, Path]
) -> None:
    from transformers import AutoTokenizer

    source = AutoTokenizer.from_pretrained(str(model))
    path = exported["q8_0"]
    inside = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    prompt = source.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
    assert (
        inside.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True)
        == prompt
    )
    for text in (prompt, "Farbe: rot -- fertig! Which colour goes with the emu?"):
        ids = source(text, add_special_tokens=False).input_ids
        assert inside(text, add_special_tokens=False).input_ids == ids
    assert (inside.eos_token, inside.pad_token) == (source.eos_token, source.pad_token)


def test_what_cannot_be_exported_is_refused_with_the_reason(model: Path, tmp_path: Path) -> None:
    import json
    import shutil

    with pytest.raises(ExportError, match="format: 'q3_k' is not one of"):
        export(model, tmp_path / "x.gguf", "q3_k")
    other = tmp_path / "other"
    shutil.copytree(model, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ExportError, match="only the Llama family"):
        export(other, tmp_path / "y.gguf", "q8_0")
