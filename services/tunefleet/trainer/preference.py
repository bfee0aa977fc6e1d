"""DPO (direct preference optimisation, Rafailov et al. 2023) on pairs of a chosen and a rejected
answer to one prompt.

Each answer is rendered after its prompt with the chat template, and only the answer's assistant
tokens count (`Conversation.answer_from`). The implicit reward of an answer is beta times the
log-probability ratio of policy and reference summed over its tokens; the loss is
-log sigmoid(reward(chosen) - reward(rejected)). The reference is the base model itself: the
same model with its adapter disabled, so no second copy is held in memory.

A micro batch holds k pairs as 2k padded rows (the chosen answers, then the rejected ones), so
that the policy reads both sides in one forward pass, as TRL's DPOTrainer does.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from tunefleet.trainer.data import IGNORE, Batch, Conversation, Example, batch_rows, encode
from tunefleet.trainer.model import adapters_disabled
from tunefleet.trainer.spec import DataSpec, SpecError


@dataclass
class PreferenceRecord:
    prompt: list[dict[str, Any]]
    chosen: list[dict[str, Any]]
    rejected: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None = None

    def conversation(self, answer: list[dict[str, Any]]) -> Conversation:
        return Conversation(self.prompt + answer, self.tools, answer_from=len(self.prompt))


@dataclass
class Pair:
    chosen: Example
    rejected: Example


@dataclass
class EncodedPairs:
    examples: list[Pair] = field(default_factory=list)
    truncated: int = 0  # pairs with an answer cut to the maximum length
    dropped: int = 0  # pairs with an answer cut so far that none of its tokens was left


def load_pairs(spec: DataSpec, path: Path) -> list[PreferenceRecord]:
    """The preference pairs of a records file (DatasetService's DATASET_KIND_PREFERENCE), one
    side of the split (or all)."""
    pairs = []
    with path.open("rb") as file:
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            record = orjson.loads(line)
            if spec.split != "all" and record.get("split", "train") != spec.split:
                continue
            if not (isinstance(record.get("chosen"), list) and record.get("rejected")):
                raise SpecError(
                    f"{spec.uri}: line {number} is not a preference pair (no `chosen` and "
                    "`rejected`): DPO trains on DATASET_KIND_PREFERENCE datasets"
                )
            pairs.append(
                PreferenceRecord(
                    record["messages"], record["chosen"], record["rejected"], record.get("tools")
                )
            )
    return pairs


def encode_pairs(tokenizer: Any, records: list[PreferenceRecord], max_length: int) -> EncodedPairs:
    result = EncodedPairs()
    for record in records:
        chosen = encode(tokenizer, [record.conversation(record.chosen)], max_length)
        rejected = encode(tokenizer, [record.conversation(record.rejected)], max_length)
        if not (chosen.examples and rejected.examples):
            result.dropped += 1
            continue
        result.truncated += bool(chosen.truncated or rejected.truncated)
        result.examples.append(Pair(chosen.examples[0], rejected.examples[0]))
    return result


def pair_batches(pairs: list[Pair], size: int, pad_id: int, seed: int, epoch: int) -> list[Batch]:
    """One epoch's micro batches of pairs, in an order fixed by the seed and the epoch."""
    order = list(range(len(pairs)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)  # noqa: S311 (not security)
    out = []
    for start in range(0, len(order), size):
        chunk = [pairs[i] for i in order[start : start + size]]
        rows = [[pair.chosen] for pair in chunk] + [[pair.rejected] for pair in chunk]
        batch = batch_rows(rows, pad_id, packed=False)
        batch.pairs = len(chunk)
        out.append(batch)
    return out


def answer_logps(model: Any, batch: Batch) -> Any:
    """The summed log-probability of each row's answer tokens (one value per row)."""
    import torch

    device = next(model.parameters()).device
    input_ids = torch.tensor(batch.input_ids, device=device)
    labels = torch.tensor(batch.labels, device=device)[:, 1:]
    logits = model(
        input_ids=input_ids,
        attention_mask=torch.tensor(batch.attention_mask, device=device),
        position_ids=torch.tensor(batch.position_ids, device=device),
    ).logits[:, :-1]
    mask = labels != IGNORE
    picked = torch.gather(
        logits.float().log_softmax(-1), 2, labels.masked_fill(~mask, 0).unsqueeze(-1)
    ).squeeze(-1)
    return (picked * mask).sum(-1)


@dataclass
class PairScores:
    """A batch's DPO losses and implicit rewards, one value per pair."""

    losses: Any
    chosen_rewards: Any
    rejected_rewards: Any


def dpo_scores(model: Any, batch: Batch, beta: float) -> PairScores:
    """DPO on a batch of pairs; gradients flow through the policy's log-probabilities only."""
    import torch
    import torch.nn.functional as F

    policy = answer_logps(model, batch)
    with torch.no_grad(), adapters_disabled(model):
        reference = answer_logps(model, batch)
    k = batch.pairs
    ratios = policy - reference
    chosen, rejected = beta * ratios[:k], beta * ratios[k:]
    return PairScores(-F.logsigmoid(chosen - rejected), chosen.detach(), rejected.detach())


def dpo_loss(model: Any, batch: Batch, beta: float) -> Any:
    """The summed DPO loss of a batch's pairs."""
    return dpo_scores(model, batch, beta).losses.sum()


def evaluate_pairs(model: Any, eval_batches: list[Batch], beta: float) -> dict[str, float]:
    """Mean DPO loss, reward accuracy (chosen strictly above rejected) and mean reward margin."""
    import torch

    was_training = model.training
    model.eval()
    loss = correct = margin = 0.0
    count = 0
    with torch.no_grad():
        for batch in eval_batches:
            scores = dpo_scores(model, batch, beta)
            loss += float(scores.losses.sum())
            correct += float((scores.chosen_rewards > scores.rejected_rewards).sum())
            margin += float((scores.chosen_rewards - scores.rejected_rewards).sum())
            count += batch.pairs
    model.train(was_training)
    count = max(count, 1)
    return {
        "validation_loss": loss / count,
        "reward_accuracy": correct / count,
        "reward_margin": margin / count,
    }
