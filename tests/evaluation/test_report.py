"""From graded items to the verdict: faults fail loud, the pairwise judge's position bias is
measured, and the gate passes only a candidate significantly better without regressions."""

from __future__ import annotations

import pytest

from tunefleet.evaluation.report import (
    EvaluationFailed,
    Gate,
    judge_gate,
    pairwise,
    summarise,
)
from tunefleet.evaluation.statistics import items_needed

BINARY = {"exact_match": True, "rouge_l": False, "general": True}


def outcomes(right: int, n: int = 40) -> list[float | None]:
    return [*([1.0] * right), *([0.0] * (n - right))]


def test_a_judge_that_always_answers_a_ties_everything_with_full_inconsistency() -> None:
    tally = pairwise(["A"] * 20, ["A"] * 20)
    assert (tally.wins, tally.losses, tally.ties) == (0, 0, 20)
    assert tally.inconsistency_rate == 1.0


def test_a_judge_that_reads_the_answers_wins_consistently() -> None:
    # The candidate is better on 15 items (named in both orders), the baseline on 5.
    first = ["A"] * 15 + ["B"] * 5
    second = ["B"] * 15 + ["A"] * 5
    tally = pairwise(first, second)
    assert (tally.wins, tally.losses, tally.ties, tally.inconsistent) == (15, 5, 0, 0)
    assert tally.win_rate.mean == 0.75 and tally.win_rate.low > 0.5


def test_a_judge_returning_garbage_fails_the_evaluation() -> None:
    with pytest.raises(EvaluationFailed, match="no verdict for 3 of 20 items"):
        pairwise(["A"] * 17 + [None] * 3, ["B"] * 20)
    # Under the threshold the garbage is counted, not scored.
    tally = pairwise(["A"] * 99 + [None], ["B"] * 100, max_error_rate=0.02)
    assert tally.errors == 1 and tally.wins == 99


def test_grader_faults_are_counted_and_fail_loud_above_the_threshold() -> None:
    scores = {
        "base": {"exact_match": outcomes(20)},
        "adapter": {"exact_match": [None] * 2 + outcomes(30)[2:]},  # 2 of 40 not graded
    }
    with pytest.raises(
        EvaluationFailed, match="exact_match could not grade 2 of 40 items of adapter"
    ):
        summarise(scores, BINARY, "base")
    summary = summarise(scores, BINARY, "base", max_error_rate=0.1)
    adapter = summary["adapter"]["exact_match"]
    assert adapter.errors == 2 and adapter.estimate.n == 38
    assert adapter.comparison is not None and adapter.comparison.n == 38  # paired on both


def test_the_gate_passes_a_significantly_better_candidate_and_names_what_fails() -> None:
    scores = {
        "base": {"exact_match": outcomes(10), "general": outcomes(30)},
        "good": {"exact_match": outcomes(30), "general": outcomes(30)},
        "zero": {"exact_match": outcomes(10), "general": outcomes(30)},
        "overfit": {"exact_match": outcomes(35), "general": outcomes(10)},
    }
    summary = summarise(scores, BINARY, "base")
    gate = Gate("exact_match", min_improvement=0.1, suites=("general",))
    assert judge_gate(gate, summary["good"]).passed
    zero = judge_gate(gate, summary["zero"])
    assert not zero.passed and "no significant difference from the baseline" in zero.reasons[0]
    overfit = judge_gate(gate, summary["overfit"])
    assert not overfit.passed and overfit.reasons == ["regressions on general (at most 0 allowed)"]
    strict = judge_gate(Gate("exact_match", min_improvement=0.6), summary["good"])
    assert strict.reasons == ["exact_match: improves by +0.500, less than the +0.600 asked"]
    assert not judge_gate(Gate("bleu"), summary["good"]).passed


def test_the_gate_says_how_many_items_an_inconclusive_comparison_needed() -> None:
    # 40 items; the candidate is right on 3 items the baseline is not, wrong on 1 it got right.
    baseline = [*([1.0] * 10), 0.0, 0.0, 0.0, 1.0, *([0.0] * 26)]
    candidate = [*([1.0] * 10), 1.0, 1.0, 1.0, 0.0, *([0.0] * 26)]
    summary = summarise({"base": {"exact_match": baseline}, "new": {"exact_match": candidate}},
                        BINARY, "base")  # fmt: skip
    verdict = judge_gate(Gate("exact_match", min_improvement=0.05), summary["new"])
    needed = items_needed(4 / 40, 0.05)
    assert not verdict.passed and verdict.items_needed == needed > 40
    assert verdict.reasons[1] == (
        f"exact_match: about {needed} items are needed to detect an improvement of +0.050 "
        "with 80% power; this evaluation has 40"
    )
    # Continuous graders get no hint (no discordance to estimate it from).
    rouge = summarise(
        {"base": {"rouge_l": baseline}, "new": {"rouge_l": candidate}}, BINARY, "base"
    )
    assert judge_gate(Gate("rouge_l", min_improvement=0.05), rouge["new"]).items_needed == 0


def test_continuous_graders_use_the_paired_bootstrap_and_clusters() -> None:
    base = [0.2, 0.4, 0.3, 0.5] * 10
    scores: dict[str, dict[str, list[float | None]]] = {
        "base": {"rouge_l": list(base)},
        "adapter": {"rouge_l": [b + 0.1 for b in base]},
    }
    summary = summarise(scores, BINARY, "base", clusters=[str(i // 4) for i in range(40)])
    comparison = summary["adapter"]["rouge_l"].comparison
    assert comparison is not None and comparison.test == "paired-bootstrap"
    assert comparison.difference == pytest.approx(0.1) and comparison.verdict == "better"


def test_graders_that_are_better_lower_turn_the_verdict() -> None:
    base = [2.0 + 0.01 * i for i in range(40)]
    better = [value - 0.5 for value in base]  # a lower perplexity on every item
    summary = summarise(
        {"base": {"nll": base}, "new": {"nll": better}}, {"nll": False}, "base", lower={"nll"}
    )
    found = summary["new"]["nll"]
    assert found.lower_is_better and found.comparison is not None
    assert found.comparison.difference == pytest.approx(-0.5)
    assert found.comparison.verdict == "better"
    assert judge_gate(Gate("nll", min_improvement=0.4), summary["new"]).passed
    strict = judge_gate(Gate("nll", min_improvement=0.6), summary["new"])
    assert strict.reasons == ["nll: improves by +0.500, less than the +0.600 asked"]
    worse = summarise(
        {"base": {"nll": better}, "new": {"nll": base}}, {"nll": False}, "base", lower={"nll"}
    )
    assert worse["new"]["nll"].comparison.verdict == "worse"  # type: ignore[union-attr]
