"""The demo's task: extract an order from a message as JSON with fixed keys. The bundled sample
(`data/orders.jsonl`) has the flaws of a real export; the metric is exact match of the parsed
JSON against the held-out answer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from typing import Any

KEYS = ("item", "quantity", "customer", "city")


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


def parse(text: str) -> dict[str, Any] | None:
    """The answer as an order, or None when it is not a JSON object with exactly the keys."""
    try:
        value = json.loads(text.strip())
    except ValueError:
        return None
    if not isinstance(value, dict) or set(value) != set(KEYS):
        return None
    return value


@dataclass
class Score:
    examples: int = 0
    exact: int = 0  # the parsed answer equals the expected order
    valid: int = 0  # a JSON object with exactly the four keys

    def add(self, answer: str, expected: str) -> None:
        self.examples += 1
        order = parse(answer)
        self.valid += order is not None
        self.exact += order is not None and order == parse(expected)

    @property
    def exact_match(self) -> float:
        return self.exact / self.examples if self.examples else 0.0

    @property
    def valid_json(self) -> float:
        return self.valid / self.examples if self.examples else 0.0

    def __str__(self) -> str:
        return (
            f"exact match {self.exact}/{self.examples} ({self.exact_match:.0%}), "
            f"valid JSON {self.valid}/{self.examples} ({self.valid_json:.0%})"
        )
