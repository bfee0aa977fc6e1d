"""LLM judges: a model grades answers with a rubric (`score_model`, OpenAI's name) or compares
a candidate's answer with the baseline's (`pairwise_judge`).

The rubric is the judge's user turn, its fields filled in; the reply must end with its verdict in
double brackets, as MT-Bench's judges write it: `[[7]]` for a score, `[[A]]`, `[[B]]` or `[[C]]`
(a tie) for a comparison. A reply without one is a fault (counted; too many fail the job), never a
low score. A pairwise judge sees every item twice, the candidate's answer first and then second:
a win or a loss counts only when both orders agree, and the share of items on which they
disagree is the judge's position bias.
"""

from __future__ import annotations

import re
import string
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from tunefleet.core.graders import GraderError
from tunefleet.v1 import common_pb2

if TYPE_CHECKING:
    from tunefleet.evaluation.runner import Candidate, EvalItem

# Ask a model (a judge) one question; its reply. Raises GenerationError when it cannot answer.
Ask = Callable[["Candidate", str], Awaitable[str]]

SCORE_RUBRIC = """\
You are grading an AI assistant's answer to the request below. Judge its correctness, \
helpfulness and faithfulness to the reference answer (when one is given); length and style do \
not count in themselves.

[Request]
{input}

[Reference answer]
{reference}

[Answer]
{output}

Explain your judgement in one or two sentences, then give a score from {min} (worst) to {max} \
(best) on the last line, in double brackets, like this: [[{max}]]"""

PAIRWISE_RUBRIC = """\
You are comparing two AI assistants' answers to the request below. Decide which answer is \
better: more correct, more helpful and more faithful to the reference answer (when one is \
given). The order in which the answers appear, their length and their style must not sway you.

[Request]
{input}

[Reference answer]
{reference}

[Answer A]
{answer_a}

[Answer B]
{answer_b}

Explain your judgement in one or two sentences, then give your verdict on the last line: [[A]] \
if answer A is better, [[B]] if answer B is better, [[C]] for a tie."""

SCORE_FIELDS = {"input", "reference", "output", "min", "max"}
PAIRWISE_FIELDS = {"input", "reference", "answer_a", "answer_b"}
_VERDICT = re.compile(r"\[\[\s*([^\[\]]*?)\s*\]\]")


def rubric_fields(rubric: str) -> set[str]:
    """The fields a rubric names; ValueError when its braces do not parse."""
    names = {name for _, name, _, _ in string.Formatter().parse(rubric) if name is not None}
    for name in names:
        if not name.isidentifier():
            raise ValueError(f"{{{name}}} is not a field name (write {{{{ and }}}} for braces)")
    return names


def check_rubric(rubric: str, allowed: set[str], required: set[str]) -> None:
    """ValueError naming what is wrong with a rubric."""
    names = rubric_fields(rubric)
    unknown = sorted(names - allowed)
    if unknown:
        raise ValueError(f"unknown fields {unknown}; it may use {sorted(allowed)}")
    missing = sorted(required - names)
    if missing:
        raise ValueError(f"it must show the answers: {sorted(missing)} missing")


def show_turns(turns: Sequence[common_pb2.ChatMessage]) -> str:
    """An item's input as a judge reads it: one user turn as it is, a conversation role by role."""
    if len(turns) == 1 and turns[0].role == "user":
        return str(turns[0].content)
    return "\n\n".join(f"{turn.role}: {turn.content}" for turn in turns)


def _verdict(reply: str) -> str:
    found = _VERDICT.findall(reply)
    if found:
        return str(found[-1])
    return reply.strip()  # a judge that answers with the verdict alone


def parse_score(reply: str, low: float, high: float) -> float:
    """The judge's score scaled to [0, 1]; GraderError when there is none in [low, high]."""
    verdict = _verdict(reply)
    try:
        value = float(verdict)
    except ValueError:
        raise GraderError(f"the judge gave no [[score]]: {_excerpt(reply)}") from None
    if not low <= value <= high:
        raise GraderError(f"the judge's score {value:g} is outside {low:g} to {high:g}")
    return (value - low) / (high - low)


def parse_choice(reply: str) -> str:
    """`A`, `B` or `tie`; GraderError when the reply names none of them."""
    verdict = _verdict(reply).upper()
    if verdict in ("A", "B"):
        return verdict
    if verdict in ("C", "TIE"):
        return "tie"
    raise GraderError(f"the judge gave no [[A]], [[B]] or [[C]]: {_excerpt(reply)}")


def _excerpt(reply: str, limit: int = 200) -> str:
    reply = " ".join(reply.split())
    return repr(reply if len(reply) <= limit else reply[:limit] + "...")


@dataclass(frozen=True)
class ScoreJudge:
    """`score_model`: a judge scores each answer from `low` to `high` with a rubric."""

    name: str
    judge: Candidate
    rubric: str = SCORE_RUBRIC
    low: float = 1.0
    high: float = 10.0
    binary: ClassVar[bool] = False
    pairwise: ClassVar[bool] = False
    lower_is_better: ClassVar[bool] = False

    async def grade(self, ask: Ask, item: EvalItem, output: str) -> tuple[float, str]:
        """The scaled score and the judge's reply."""
        prompt = self.rubric.format(
            input=show_turns(item.messages),
            reference=item.reference,
            output=output,
            min=f"{self.low:g}",
            max=f"{self.high:g}",
        )
        reply = await ask(self.judge, prompt)
        return parse_score(reply, self.low, self.high), reply


@dataclass(frozen=True)
class PairwiseJudge:
    """`pairwise_judge`: a judge compares a candidate's answer with the baseline's, twice."""

    name: str
    judge: Candidate
    rubric: str = PAIRWISE_RUBRIC
    binary: ClassVar[bool] = False
    pairwise: ClassVar[bool] = True
    lower_is_better: ClassVar[bool] = False

    async def ask_order(self, ask: Ask, item: EvalItem, first: str, second: str) -> str:
        prompt = self.rubric.format(
            input=show_turns(item.messages),
            reference=item.reference,
            answer_a=first,
            answer_b=second,
        )
        return await ask(self.judge, prompt)


def pairwise_score(candidate_first: str, baseline_first: str) -> float:
    """An item's score from the two orders' choices: 1 a win, 0 a loss, 0.5 a tie (a tie too
    when the orders disagree)."""
    one = {"A": 1.0, "B": 0.0}.get(candidate_first, 0.5)
    two = {"A": 0.0, "B": 1.0}.get(baseline_first, 0.5)
    return one if one == two else 0.5
