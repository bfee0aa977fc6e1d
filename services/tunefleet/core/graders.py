"""Graders: one score per item in [0, 1], named as the wider ecosystem names them (OpenAI's grader
vocabulary: `string_check` with `eq`/`ne`/`like`/`ilike`, `text_similarity` metrics).

Binary graders (exact match, string checks, JSON validity and schema, classification) score 0 or
1, and their comparisons use McNemar's test; the others (token F1, BLEU, chrF, ROUGE-L) are
continuous and use the paired bootstrap. BLEU and chrF are sacrebleu's sentence scores divided
by 100; ROUGE-L is rouge-score's LCS F-measure (the tests' reference; not a dependency, as it
comes as a source package only). A grader that cannot grade an item raises `GraderError`: the job
counts it and fails loud above its threshold, never a silent 0.
"""

from __future__ import annotations

import json
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

# The graders a job can name by type alone, without options (`perplexity` and `kl_from_base` are
# evaluation/likelihood.py's): what settings and the command line accept by name.
BY_NAME = (
    "exact_match",
    "json_valid",
    "token_f1",
    "bleu",
    "chrf",
    "rouge_l",
    "classification",
    "perplexity",
    "kl_from_base",
)


class GraderError(Exception):
    """An item the grader could not grade (not a wrong answer: a fault to count)."""


@dataclass(frozen=True)
class Item:
    """An evaluation item: the model's input is elsewhere; graders read the expected answer."""

    id: str
    reference: str = ""
    cluster: str = ""  # items of one cluster are not independent (statistics)


@dataclass(frozen=True)
class Grader:
    name: str
    binary: bool
    score: Callable[[str, Item], float]
    pairwise: ClassVar[bool] = False  # it compares with the baseline's answer (judges.py)
    lower_is_better: ClassVar[bool] = False  # likelihood.py's are


def _exact_match(output: str, item: Item) -> float:
    return float(output.strip() == item.reference.strip())


def _normalised_match(output: str, item: Item) -> float:
    return float(normalise_answer(output) == normalise_answer(item.reference))


_OPERATIONS: dict[str, Callable[[str, str], bool]] = {
    "eq": lambda output, reference: output == reference,
    "ne": lambda output, reference: output != reference,
    "like": lambda output, reference: reference in output,
    "ilike": lambda output, reference: reference.lower() in output.lower(),
}


def _words_in(output: str, reference: str) -> bool:
    """Whether the reference's words appear together, in order, among the output's words."""
    return f" {reference} " in f" {output} "


_NORMALISED = {**_OPERATIONS, "like": _words_in, "ilike": _words_in}  # case is gone already


def string_check(
    operation: str, value: str = "", normalise: bool = False
) -> Callable[[str, Item], float]:
    """OpenAI's string check: `eq`, `ne`, `like` (contains), `ilike` (contains, any case), and
    `regex` (a Python regular expression that must match somewhere); compared with `value`, or
    with the item's reference when `value` is empty. With `normalise`, both sides are
    normalised as SQuAD does first, and `like` matches whole words only ("3" is not in "13"):
    the grading of a model that answers in sentences ("The capital of France is Paris.")."""
    if normalise:
        if operation not in _NORMALISED:
            raise ValueError(f"string_check {operation!r} cannot normalise (eq, ne, like, ilike)")
        normalised = _NORMALISED[operation]

        def compare_normalised(output: str, item: Item) -> float:
            reference = normalise_answer(value or item.reference)
            if not reference and normalised is _words_in:
                raise GraderError("the reference has no words once normalised")  # all would match
            return float(normalised(normalise_answer(output), reference))

        return compare_normalised
    if operation == "regex":
        pattern = re.compile(value) if value else None

        def regex(output: str, item: Item) -> float:
            try:
                return float(bool((pattern or re.compile(item.reference)).search(output)))
            except re.error as error:
                message = f"the item's reference is not a regular expression: {error}"
                raise GraderError(message) from None

        return regex
    if operation not in _OPERATIONS:
        raise ValueError(f"unknown string_check operation {operation!r}")
    check = _OPERATIONS[operation]

    def compare(output: str, item: Item) -> float:
        return float(check(output, value or item.reference))

    return compare


def _json_valid(output: str, item: Item) -> float:
    try:
        json.loads(output)
    except ValueError:
        return 0.0
    return 1.0


def json_schema(schema: dict[str, Any]) -> Callable[[str, Item], float]:
    """1 when the output is JSON that the schema (any draft jsonschema knows) accepts."""
    from jsonschema import validators

    validator = validators.validator_for(schema)(schema)
    validator.check_schema(schema)

    def grade(output: str, item: Item) -> float:
        try:
            document = json.loads(output)
        except ValueError:
            return 0.0
        return float(validator.is_valid(document))

    return grade


_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalise_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(_ARTICLES.sub(" ", text).split())


def _token_f1(output: str, item: Item) -> float:
    predicted, expected = normalise_answer(output).split(), normalise_answer(item.reference).split()
    if not predicted or not expected:
        return float(predicted == expected)
    common = sum((Counter(predicted) & Counter(expected)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def _bleu(output: str, item: Item) -> float:
    import sacrebleu

    return float(sacrebleu.sentence_bleu(output, [item.reference]).score) / 100


def _chrf(output: str, item: Item) -> float:
    import sacrebleu

    return float(sacrebleu.sentence_chrf(output, [item.reference]).score) / 100


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


def _lcs(a: list[str], b: list[str]) -> int:
    """The length of the longest common subsequence (one row of the table at a time)."""
    previous = [0] * (len(b) + 1)
    for token in a:
        current = [0]
        for j, other in enumerate(b):
            current.append(previous[j] + 1 if token == other else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def _rouge_l(output: str, item: Item) -> float:
    """ROUGE-L F-measure as rouge-score computes it (lower-cased words, no stemming), except
    that words of every script count (rouge-score keeps [a-z0-9] only)."""
    predicted, expected = _words(output), _words(item.reference)
    common = _lcs(expected, predicted)
    if common == 0:
        return 0.0
    precision, recall = common / len(predicted), common / len(expected)
    return 2 * precision * recall / (precision + recall)


def grader(kind: str, **options: Any) -> Grader:
    """A grader by its name, with its options (`exact_match`: normalise; `string_check`:
    operation, value, normalise; `json_schema`: schema)."""
    binary: dict[str, Callable[[str, Item], float]] = {
        "exact_match": _exact_match,
        "json_valid": _json_valid,
        # A classifier's label compared with the expected one (accuracy; macro F1 below).
        "classification": _exact_match,
    }
    continuous: dict[str, Callable[[str, Item], float]] = {
        "token_f1": _token_f1,
        "bleu": _bleu,
        "chrf": _chrf,
        "rouge_l": _rouge_l,
    }
    if kind == "exact_match" and options.get("normalise"):
        return Grader(kind, True, _normalised_match)
    if kind in binary:
        return Grader(kind, True, binary[kind])
    if kind in continuous:
        return Grader(kind, False, continuous[kind])
    if kind == "string_check":
        return Grader(kind, True, string_check(**options))
    if kind == "json_schema":
        return Grader(kind, True, json_schema(options["schema"]))
    raise ValueError(f"unknown grader {kind!r}")


def macro_f1(predicted: Sequence[str], expected: Sequence[str]) -> float:
    """The mean over the expected labels of each label's F1 (predictions stripped)."""
    pairs = [(p.strip(), e.strip()) for p, e in zip(predicted, expected, strict=True)]
    labels = sorted({e for _, e in pairs})
    if not labels:
        return float("nan")
    scores = []
    for label in labels:
        true_positive = sum(1 for p, e in pairs if p == label and e == label)
        predicted_as = sum(1 for p, _ in pairs if p == label)
        actual = sum(1 for _, e in pairs if e == label)
        if true_positive == 0:
            scores.append(0.0)
            continue
        precision, recall = true_positive / predicted_as, true_positive / actual
        scores.append(2 * precision * recall / (precision + recall))
    return sum(scores) / len(scores)
