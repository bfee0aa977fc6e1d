"""The demo's task: extract an order from a message as JSON with fixed keys. The bundled sample
(`data/orders.jsonl`) has the flaws of a real export; EvaluationService grades answers by exact
match with the held-out answer and by JSON validity."""

from __future__ import annotations

import json
from importlib import resources


def sample() -> bytes:
    return resources.files("tunefleet.demo.data").joinpath("orders.jsonl").read_bytes()


def corpus() -> list[str]:
    """The sample's lines, for the tiny model's tokenizer."""
    return sample().decode().splitlines()


def questions() -> list[str]:
    """The sample's requests without their answers: what the tiny model is pretrained on, so
    that it knows the words but not the task."""
    texts: list[str] = []
    for line in corpus():
        try:
            messages = json.loads(line)["messages"]
        except (ValueError, KeyError, TypeError):
            continue
        texts.extend(m["content"] for m in messages if m.get("role") == "user")
    return texts
