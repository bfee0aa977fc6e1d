"""A tiny chat model built locally (random Llama + byte-level BPE with a chat template) and a
learnable synthetic task: each animal has its colour."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tunefleet.demo import models

ANIMALS = ["cat", "dog", "owl", "fox", "bee", "elk", "yak", "emu", "ant", "bat", "cow", "pig"]
COLOURS = [
    "red",
    "blue",
    "green",
    "pink",
    "gold",
    "grey",
    "teal",
    "navy",
    "lime",
    "plum",
    "rust",
    "sand",
]
TEMPLATE = models.TINY_TEMPLATE
# A template for tool use in the Hermes form (Qwen 2.5/3, SmolLM3): the tools are listed in a
# system turn, each call is written as <tool_call>{"name": ..., "arguments": ...}</tool_call>.
TOOL_TEMPLATE = (
    "{% if tools %}<|system|>tools:{% for t in tools %} {{ t.function.name }}{% endfor %}<|end|>"
    "{% endif %}{% for m in messages %}<|{{ m['role'] }}|>{% if m.tool_calls %}"
    '{% for c in m.tool_calls %}<tool_call>{"name": "{{ c.function.name }}", "arguments": '
    "{{ c.function.arguments | tojson }}}</tool_call>{% endfor %}{% else %}{{ m['content'] }}"
    "{% endif %}<|end|>{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def conversation(
    animal: str, colour: str, answer: str = "Colour: {}. Done."
) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": "Answer with one colour."},
        {"role": "user", "content": f"Which colour goes with the {animal}?"},
        {"role": "assistant", "content": answer.format(colour)},
    ]


def build_chat_model(path: Path, hidden_size: int = 64, heads: int = 2, **options: Any) -> Path:
    """A random Llama with a byte-level BPE tokenizer and a chat template, saved in `path`
    (`options`: more of `models.build_chat_model`'s, such as `max_positions`)."""
    corpus = [TEMPLATE, "Farbe: {} -- fertig!"] + [
        json.dumps(conversation(a, c)) for a in ANIMALS for c in COLOURS
    ]
    return models.build_chat_model(path, corpus, hidden_size=hidden_size, heads=heads, **options)


@pytest.fixture(scope="session")
def chat_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_chat_model(tmp_path_factory.mktemp("chat-model"))


def tool_record(animal: str, colour: str) -> dict[str, Any]:
    """An OpenAI chat record of the task with a tool: the assistant looks the colour up."""
    call = {"name": "colour_of", "arguments": json.dumps({"animal": animal})}
    return {
        "tools": [{"type": "function", "function": COLOUR_TOOL}],
        "messages": [
            {"role": "user", "content": f"Which colour goes with the {animal}?"},
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": "call_1", "type": "function", "function": call}],
            },
            {"role": "tool", "tool_call_id": "call_1", "content": colour},
            {"role": "assistant", "content": f"Colour: {colour}. Done."},
        ],
    }


COLOUR_TOOL: dict[str, Any] = {
    "name": "colour_of",
    "description": "The colour of an animal.",
    "parameters": {"type": "object", "properties": {"animal": {"type": "string"}}},
}


@pytest.fixture(scope="session")
def tool_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny chat model with a template that renders tools and writes calls (Hermes form)."""
    corpus = [TOOL_TEMPLATE] + [json.dumps(tool_record(a, c)) for a in ANIMALS for c in COLOURS]
    return models.build_chat_model(
        tmp_path_factory.mktemp("tool-model"), corpus, template=TOOL_TEMPLATE
    )


def write_records(
    path: Path, train: int, validation: int, seed: int = 0, answer: str = "Colour: {}. Done."
) -> Path:
    """Records as DatasetService writes them; `answer` is the format of the answers."""
    rng = random.Random(seed)
    mapping = dict(zip(ANIMALS, COLOURS, strict=True))
    with path.open("w") as out:
        for index in range(train + validation):
            animal = ANIMALS[index % len(ANIMALS)] if index < train else rng.choice(ANIMALS)
            record = {
                "index": index,
                "messages": conversation(animal, mapping[animal], answer),
                "split": "train" if index < train else "validation",
            }
            out.write(json.dumps(record) + "\n")
    return path


MakeSpec = Callable[..., dict[str, Any]]
LINEAR_LAYERS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture
def make_spec(chat_model: Path, tmp_path: Path) -> MakeSpec:
    records = write_records(tmp_path / "records.jsonl", train=96, validation=24)

    def make(output: str = "out", **overrides: Any) -> dict[str, Any]:
        hyper = {
            "learning_rate": 1e-2,
            "epochs": 4,
            "micro_batch_size": 8,
            "max_sequence_length": 64,
            "warmup_ratio": 0.1,
            "seed": 7,
            **overrides.pop("hyperparameters", {}),
        }
        spec = {
            "base_model": str(chat_model),
            "method": "lora",
            # A random model's output layer is random: adapting it as well lets a small adapter
            # learn the task in a few steps (PEFT's all-linear leaves the output layer out).
            "lora": {"rank": 8, "dropout": 0.0, "target_modules": [*LINEAR_LAYERS, "lm_head"]},
            "hyperparameters": hyper,
            "train_data": {"uri": str(records), "split": "train"},
            "output_dir": str(tmp_path / output),
        }
        spec.update(overrides)
        return spec

    return make
