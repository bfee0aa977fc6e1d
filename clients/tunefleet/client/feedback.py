"""Production feedback as training data: the selection the retraining loop makes, usable alone.

From feedback listed with its responses (`inference.list_feedback(include_responses=True)`):
- a negative rating with a corrected answer is an SFT example (the input, then the correction)
  and a preference pair (the correction preferred to what the model wrote);
- two responses to the same input rated differently (an A/B comparison) are a preference pair:
  the best-rated preferred to the worst;
- a positive rating is an SFT example of the model's own answer, for a seeded `positive_fraction`
  of them (keeping what already works in the mix);
- anything else (a negative rating without a correction, a prompt given as token ids) teaches
  nothing on its own, and is counted in `skipped` with the reason.
Examples are OpenAI chat records (`messages`, with `tools`; a raw prompt is the user's turn);
pairs are in TRL's explicit-prompt form (`prompt`, `chosen`, `rejected`). These are formats
DatasetService reads, which then removes duplicates and PII as for any upload.

Example::

    feedback = client.inference.list_feedback(
        'adapter_version = "adapters/orders/*"', include_responses=True
    )
    examples = training_examples(feedback, positive_fraction=0.2)
    client.datasets.upload(examples.sft_jsonl(), display_name="orders-feedback")
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tunefleet.client.inference import openai_message, openai_tool
from tunefleet.v1 import inference_pb2


@dataclass
class Examples:
    """Training examples made from feedback, and which feedback they came from."""

    sft: list[dict[str, Any]] = field(default_factory=list)
    pairs: list[dict[str, Any]] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)  # feedback names used, in order
    # The feedback each example and each pair came from (one, or the two of an A/B pair).
    sft_sources: list[list[str]] = field(default_factory=list)
    pair_sources: list[list[str]] = field(default_factory=list)
    skipped: Counter[str] = field(default_factory=Counter)  # reason -> feedback count

    def sft_jsonl(self) -> bytes:
        return _jsonl(self.sft)

    def pairs_jsonl(self) -> bytes:
        return _jsonl(self.pairs)


def training_examples(
    feedback: Iterable[inference_pb2.Feedback], *, positive_fraction: float = 0.0, seed: int = 0
) -> Examples:
    """The examples `feedback` (listed with `include_responses`) makes; see the module."""
    if not 0.0 <= positive_fraction <= 1.0:
        raise ValueError("positive_fraction: must be 0 to 1")
    examples = Examples()
    used: set[str] = set()
    unused: dict[str, str] = {}  # feedback name -> why it made no example (yet)
    by_input: dict[bytes, list[inference_pb2.Feedback]] = defaultdict(list)
    for item in feedback:
        if not item.HasField("response"):
            raise ValueError(f"{item.name}: listed without its response (include_responses)")
        if item.response.WhichOneof("input") not in ("prompt", "chat"):
            unused[item.name] = "token_ids_input"
            continue
        by_input[_input_key(item.response)].append(item)
        if item.rating < 0 and item.corrected_text:
            examples.sft.append(_record(item.response, item.corrected_text))
            examples.sft_sources.append([item.name])
            if item.corrected_text.strip() != item.response.text.strip():
                examples.pairs.append(_pair(item.response, item.corrected_text, item.response.text))
                examples.pair_sources.append([item.name])
            used.add(item.name)
        elif item.rating > 0 and _sampled(item.name, positive_fraction, seed):
            examples.sft.append(_record(item.response, item.corrected_text or item.response.text))
            examples.sft_sources.append([item.name])
            used.add(item.name)
        elif item.rating < 0:
            unused[item.name] = "negative_without_correction"
        elif item.rating > 0:
            unused[item.name] = "positive_not_sampled"
        else:
            unused[item.name] = "neutral"
    for group in by_input.values():
        best = max(group, key=lambda f: f.rating)
        worst = min(group, key=lambda f: f.rating)
        if best.rating > worst.rating and best.response.text != worst.response.text:
            examples.pairs.append(_pair(best.response, best.response.text, worst.response.text))
            examples.pair_sources.append([best.name, worst.name])
            used.update((best.name, worst.name))
    examples.skipped = Counter(why for name, why in unused.items() if name not in used)
    examples.sources = sorted(used)
    return examples


def _sampled(name: str, fraction: float, seed: int) -> bool:
    """Deterministically, `fraction` of names: the same feedback in or out on every run."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _input_key(response: inference_pb2.RecordedResponse) -> bytes:
    """The same for responses to the same input (a prompt, or a chat with its tools)."""
    if response.WhichOneof("input") == "prompt":
        return b"prompt:" + response.prompt.encode()
    return b"chat:" + response.chat.SerializeToString(deterministic=True)


def _turns(response: inference_pb2.RecordedResponse) -> list[dict[str, Any]]:
    """The input as chat turns: a completions prompt is the user's turn, as DatasetService reads
    prompt/completion records (one file holds one format, and answers to both APIs mix)."""
    if response.WhichOneof("input") == "prompt":
        return [{"role": "user", "content": response.prompt}]
    return [openai_message(m) for m in response.chat.messages]


def _record(response: inference_pb2.RecordedResponse, answer: str) -> dict[str, Any]:
    """An SFT record: the input, then `answer`."""
    record: dict[str, Any] = {
        "messages": [*_turns(response), {"role": "assistant", "content": answer}]
    }
    if response.chat.tools:
        record["tools"] = [openai_tool(t) for t in response.chat.tools]
    return record


def _pair(response: inference_pb2.RecordedResponse, chosen: str, rejected: str) -> dict[str, Any]:
    """A preference pair in TRL's explicit-prompt form."""
    pair: dict[str, Any] = {
        "prompt": _turns(response),
        "chosen": [{"role": "assistant", "content": chosen}],
        "rejected": [{"role": "assistant", "content": rejected}],
    }
    if response.chat.tools:
        pair["tools"] = [openai_tool(t) for t in response.chat.tools]
    return pair


def _jsonl(records: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(r, ensure_ascii=False).encode() + b"\n" for r in records)
