"""Training data: records rendered with the base model's chat template, labels on assistant
tokens only, truncation that is counted, and batches with or without packing.

Assistant spans are found on the rendered text: the rendering of the turns before an assistant
turn (with the generation prompt) and the rendering up to and including it are prefixes of the
whole conversation, so the characters between them are the assistant's; token offsets then say
which tokens carry loss. This works with any chat template.

Tool calls are rendered by the template itself: a conversation's tools go to it as `tools`, and an
assistant's calls as `tool_calls` in OpenAI's form, so the call's tokens are the assistant's and
carry loss (`tunefleet.core.chat`, which serving shares). TrainingService refuses such data for
a template that does not render calls (`renders_tool_calls`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from tunefleet.core.chat import Message, render
from tunefleet.trainer.spec import DataSpec

IGNORE = -100


@dataclass
class Conversation:
    """One record's turns, and the tools its assistant may call."""

    messages: list[Message]
    tools: list[dict[str, Any]] | None = None
    # Turns before this index are context only: their assistant turns carry no loss (a
    # preference pair's prompt).
    answer_from: int = 0


def load_conversations(spec: DataSpec, path: Path | None = None) -> list[Conversation]:
    """The conversations of a records file (at `path` when it was fetched), one side of the
    split (or all)."""
    conversations = []
    with (path or spec.path()).open("rb") as file:
        for line in file:
            if not line.strip():
                continue
            record = orjson.loads(line)
            if spec.split == "all" or record.get("split", "train") == spec.split:
                conversations.append(Conversation(record["messages"], record.get("tools")))
    return conversations


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]

    @property
    def trainable(self) -> int:
        return sum(label != IGNORE for label in self.labels)


@dataclass
class Encoded:
    examples: list[Example] = field(default_factory=list)
    truncated: int = 0  # cut to the maximum length, some assistant tokens kept
    dropped: int = 0  # cut so far that no assistant token was left


def encode(
    tokenizer: Any, conversations: list[Conversation] | list[list[Message]], max_length: int
) -> Encoded:
    result = Encoded()
    for conversation in conversations:
        if not isinstance(conversation, Conversation):
            conversation = Conversation(conversation)
        messages, tools = conversation.messages, conversation.tools
        full = render(tokenizer, messages, tools=tools)
        spans = []
        for index, message in enumerate(messages):
            if (
                message["role"] != "assistant"
                or message.get("weight", 1) == 0
                or index < conversation.answer_from
            ):
                continue
            start = len(render(tokenizer, messages[:index], generation_prompt=True, tools=tools))
            end = len(render(tokenizer, messages[: index + 1], tools=tools))
            spans.append((start, end))
        encoding = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids: list[int] = encoding["input_ids"]
        labels = [
            token if any(s <= begin and stop <= e for s, e in spans) and stop > begin else IGNORE
            for token, (begin, stop) in zip(ids, encoding["offset_mapping"], strict=True)
        ]
        if len(ids) > max_length:
            ids, labels = ids[:max_length], labels[:max_length]
            if all(label == IGNORE for label in labels):
                result.dropped += 1
                continue
            result.truncated += 1
        if any(label != IGNORE for label in labels):
            result.examples.append(Example(ids, labels))
    return result


@dataclass
class Batch:
    """Tensors-to-be for one micro batch (plain lists; the training loop makes tensors)."""

    input_ids: list[list[int]]
    labels: list[list[int]]
    position_ids: list[list[int]]
    # For packed rows: the example each position belongs to (attention stays inside it);
    # None for padded batches, where an ordinary padding mask is enough.
    segments: list[list[int]] | None
    attention_mask: list[list[int]]
    # Preference batches: the number of pairs, whose chosen rows come first, then the rejected.
    pairs: int = 0

    @property
    def tokens(self) -> int:
        return sum(sum(1 for m in row if m) for row in self.attention_mask)

    @property
    def trainable(self) -> int:
        return sum(sum(1 for label in row[1:] if label != IGNORE) for row in self.labels)


def batches(
    examples: list[Example],
    size: int,
    pad_id: int,
    packing: bool,
    max_length: int,
    seed: int,
    epoch: int,
) -> list[Batch]:
    """One epoch's micro batches, in an order fixed by the seed and the epoch."""
    order = list(range(len(examples)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)  # noqa: S311 (not security)
    rows = _pack(examples, order, max_length) if packing else [[examples[i]] for i in order]
    return [batch_rows(rows[i : i + size], pad_id, packing) for i in range(0, len(rows), size)]


def _pack(examples: list[Example], order: list[int], max_length: int) -> list[list[Example]]:
    """First-fit: each example goes into the first row with room for it."""
    rows: list[list[Example]] = []
    room: list[int] = []
    for index in order:
        example = examples[index]
        length = len(example.input_ids)
        slot = next((r for r, free in enumerate(room) if free >= length), None)
        if slot is None:
            rows.append([example])
            room.append(max_length - length)
        else:
            rows[slot].append(example)
            room[slot] -= length
    return rows


def batch_rows(rows: list[list[Example]], pad_id: int, packed: bool) -> Batch:
    """Rows of one or more (packed) examples, padded to the longest."""
    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    batch = Batch([], [], [], [] if packed else None, [])
    for row in rows:
        ids, labels, positions, segments = [], [], [], []
        for number, example in enumerate(row):
            ids += example.input_ids
            # The first token of an example is never a target: nothing before it in the row
            # belongs to the same example.
            labels += [IGNORE, *example.labels[1:]]
            positions += list(range(len(example.input_ids)))
            segments += [number + 1] * len(example.input_ids)
        padding = width - len(ids)
        batch.input_ids.append(ids + [pad_id] * padding)
        batch.labels.append(labels + [IGNORE] * padding)
        batch.position_ids.append(positions + [0] * padding)
        batch.attention_mask.append([1] * len(ids) + [0] * padding)
        if batch.segments is not None:
            batch.segments.append(segments + [0] * padding)
    return batch
