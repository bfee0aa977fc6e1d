"""Graders that read the model's probabilities (InferenceService's ScoreCompletion), not its
answers: perplexity on the reference answers, and KL from the base model, which measures how far
an adapter moved the model's distribution on a fixed set of prompts without needing labels
(forgetting shows there before any benchmark drops).

Both score an item in nats per token, and lower is better. External endpoints give no
probabilities, so neither applies to them (a job naming both is refused).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from tunefleet.core.graders import GraderError
from tunefleet.v1 import inference_pb2

if TYPE_CHECKING:
    from tunefleet.evaluation.runner import Answer, Candidate, EvalItem

# The log-probability of each token of a completion (a text, or token ids) after an item's
# turns, under a candidate.
Score = Callable[["Candidate", "EvalItem", str | Sequence[int]], Awaitable[Sequence[float]]]
Sample = Callable[["Candidate", "EvalItem", inference_pb2.SamplingParams], Awaitable["Answer"]]


def _mean(values: Sequence[float]) -> float:
    if not values:
        raise GraderError("no tokens to score")
    return sum(values) / len(values)


@dataclass(frozen=True)
class Perplexity:
    """`perplexity`: the reference answer's mean negative log-likelihood per token under the
    candidate (the log of its perplexity; exp of the mean over items is the perplexity of the
    typical item)."""

    name: str
    binary: ClassVar[bool] = False
    pairwise: ClassVar[bool] = False
    lower_is_better: ClassVar[bool] = True

    async def grade(self, score: Score, candidate: Candidate, item: EvalItem) -> float:
        if not item.reference:
            raise GraderError("the item has no reference answer to score")
        return -_mean(await score(candidate, item, item.reference))


@dataclass(frozen=True)
class KlFromBase:
    """`kl_from_base`: sample an answer from the candidate (temperature 1, a seed per item),
    then the mean over its tokens (the sampled ids themselves) of log p_candidate - log p_base,
    both given the same turns:
    an unbiased estimate of KL(candidate || base) per token (single items may come out
    negative; the mean over items does not, in expectation). The base model scores 0 without a
    call."""

    name: str
    max_tokens: int = 64
    seed: int = 0
    binary: ClassVar[bool] = False
    pairwise: ClassVar[bool] = False
    lower_is_better: ClassVar[bool] = True

    async def grade(
        self, score: Score, sample: Sample, candidate: Candidate, item: EvalItem, index: int
    ) -> float:
        if not candidate.adapter:
            return 0.0
        sampling = inference_pb2.SamplingParams(
            max_tokens=self.max_tokens, temperature=1.0, seed=self.seed + index
        )
        answer = (await sample(candidate, item, sampling)).token_ids
        if not answer:
            raise GraderError("the candidate's sampled answer is empty: nothing to compare")
        # Its own tokens, scored under both (the text tokenised again might split otherwise).
        own = await score(candidate, item, answer)
        theirs = await score(dataclasses.replace(candidate, adapter=""), item, answer)
        return _mean([o - b for o, b in zip(own, theirs, strict=True)])
