"""From graded items to a report: per candidate and grader the mean and its interval, per
candidate against the baseline the paired comparison on the items both were graded on, the
pairwise judge's tally with its position bias, and the gate's verdict with its reasons.

Faults are counted, never scored: an item a grader could not grade (or a judge reply that does
not parse) is an error, and more errors than `max_error_rate` fail the evaluation naming the
grader, the candidate and the count (a silent 0 would read as a wrong answer).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from tunefleet.evaluation.judges import pairwise_score
from tunefleet.evaluation.statistics import (
    Comparison,
    Estimate,
    items_needed,
    mean_interval,
    paired_binary,
    paired_bootstrap,
    wilson,
)

# One candidate's scores under one grader, item by item (None: the grader could not grade it).
Scores = Sequence[float | None]


class EvaluationFailed(Exception):
    """The evaluation cannot be trusted (too many grader faults); the message says why."""


@dataclass(frozen=True)
class GraderSummary:
    estimate: Estimate
    errors: int
    comparison: Comparison | None = None  # against the baseline; None for the baseline
    tally: PairwiseTally | None = None  # pairwise judges
    lower_is_better: bool = False  # a negative difference is an improvement (its verdict says)


def summarise(
    scores: Mapping[str, Mapping[str, Scores]],
    binary: Mapping[str, bool],
    baseline: str,
    clusters: Sequence[str] | None = None,
    max_error_rate: float = 0.02,
    lower: Collection[str] = (),
) -> dict[str, dict[str, GraderSummary]]:
    """`scores[candidate][grader]` item by item (the same items, in the same order, for every
    candidate) -> summaries by candidate and grader; graders in `lower` are better lower."""
    out: dict[str, dict[str, GraderSummary]] = {}
    for candidate, by_grader in scores.items():
        out[candidate] = {}
        for name, values in by_grader.items():
            errors = sum(1 for v in values if v is None)
            if values and errors / len(values) > max_error_rate:
                raise EvaluationFailed(
                    f"grader {name} could not grade {errors} of {len(values)} items of "
                    f"{candidate} (more than {max_error_rate:.0%})"
                )
            kept = [i for i, v in enumerate(values) if v is not None]
            graded = [float(values[i]) for i in kept]  # type: ignore[arg-type]
            if binary[name] and not clusters:
                estimate = wilson(sum(1 for v in graded if v >= 0.5), len(graded))
            else:  # Wilson's interval assumes independent items; clustered ones are not
                where = [clusters[i] for i in kept] if clusters else None
                estimate = mean_interval(graded, where)
            comparison = None
            if candidate != baseline:
                comparison = _compare(scores[baseline][name], values, binary[name])
                if name in lower:
                    comparison = dataclasses.replace(
                        comparison, verdict=FLIPPED[comparison.verdict]
                    )
            out[candidate][name] = GraderSummary(
                estimate, errors, comparison, lower_is_better=name in lower
            )
    return out


# A verdict on a difference, for a grader whose lower scores are better.
FLIPPED = {
    "better": "worse",
    "worse": "better",
    "no significant difference": "no significant difference",
}


def _compare(baseline: Scores, candidate: Scores, binary: bool) -> Comparison:
    """Paired on the items both were graded on."""
    pairs = [
        (float(b), float(c))
        for b, c in zip(baseline, candidate, strict=True)
        if b is not None and c is not None
    ]
    if binary:
        return paired_binary([b >= 0.5 for b, _ in pairs], [c >= 0.5 for _, c in pairs])
    return paired_bootstrap([b for b, _ in pairs], [c for _, c in pairs])


@dataclass(frozen=True)
class PairwiseTally:
    """A pairwise judge's verdicts on candidate (A) against baseline (B), each item judged in
    both orders; a win or a loss counts only when both orders agree."""

    wins: int
    losses: int
    ties: int  # judged even, or the two orders disagreed
    inconsistent: int  # the two orders disagreed (position bias)
    errors: int  # a reply that named neither answer
    win_rate: Estimate  # wins over the items judged, Wilson's interval

    @property
    def inconsistency_rate(self) -> float:
        judged = self.wins + self.losses + self.ties
        return self.inconsistent / judged if judged else 0.0


def pairwise(
    candidate_first: Sequence[str | None],
    baseline_first: Sequence[str | None],
    max_error_rate: float = 0.02,
    what: str = "the pairwise judge",
) -> PairwiseTally:
    """Tally a judge's replies: `candidate_first[i]` names the better answer ("A", "B" or
    "tie") with the candidate shown first, `baseline_first[i]` with the baseline first; None is
    a reply that did not parse (or an item that could not be judged)."""
    wins = losses = ties = inconsistent = errors = 0
    for first, second in zip(candidate_first, baseline_first, strict=True):
        if first is None or second is None:
            errors += 1
            continue
        # Who each order prefers: the candidate, the baseline, or neither.
        one = {"A": "candidate", "B": "baseline"}.get(first, "tie")
        two = {"A": "baseline", "B": "candidate"}.get(second, "tie")
        if one == two == "candidate":
            wins += 1
        elif one == two == "baseline":
            losses += 1
        else:
            ties += 1
            inconsistent += one != two
    total = len(candidate_first)
    if total and errors / total > max_error_rate:
        raise EvaluationFailed(
            f"{what}: no verdict for {errors} of {total} items (more than {max_error_rate:.0%})"
        )
    judged = wins + losses + ties
    return PairwiseTally(wins, losses, ties, inconsistent, errors, wilson(wins, judged))


def summarise_pairwise(
    choices: Sequence[tuple[str | None, str | None]],
    what: str,
    clusters: Sequence[str] | None = None,
    max_error_rate: float = 0.02,
) -> GraderSummary:
    """A pairwise judge's summary for one candidate from its choices item by item (candidate
    first, baseline first): the mean item score (win 1, tie 0.5, loss 0) with its interval, the
    tally, and the exact sign test of wins against losses (McNemar's test, as a win is an item
    only the candidate "got right")."""
    tally = pairwise([c[0] for c in choices], [c[1] for c in choices], max_error_rate, what)
    kept = [i for i, (a, b) in enumerate(choices) if a is not None and b is not None]
    scores = [pairwise_score(*choices[i]) for i in kept]  # type: ignore[arg-type]
    estimate = mean_interval(scores, [clusters[i] for i in kept] if clusters else None)
    won = [s == 1.0 for s in scores]
    lost = [s == 0.0 for s in scores]
    comparison = dataclasses.replace(paired_binary(lost, won), test="sign-exact")
    return GraderSummary(estimate, tally.errors, comparison, tally)


@dataclass(frozen=True)
class Gate:
    """When a candidate may replace the baseline: on `metric` it must be significantly better
    at `level` and by at least `min_improvement`; on `suites` (graders of general skills) at
    most `max_regressions` may be significantly worse."""

    metric: str
    min_improvement: float = 0.0
    suites: tuple[str, ...] = ()
    max_regressions: int = 0


@dataclass(frozen=True)
class GateVerdict:
    passed: bool
    reasons: list[str] = field(default_factory=list)
    items_needed: int = 0  # the power hint, when the metric showed no significant difference


def judge_gate(gate: Gate, summary: Mapping[str, GraderSummary]) -> GateVerdict:
    """The gate on one candidate's summaries (compared with the baseline)."""
    reasons = []
    found = summary.get(gate.metric)
    if found is None or found.comparison is None:
        return GateVerdict(False, [f"{gate.metric}: not measured against the baseline"])
    comparison = found.comparison
    needed = 0
    if comparison.verdict != "better":
        relation = "than" if comparison.verdict == "worse" else "from"
        reasons.append(
            f"{gate.metric}: {comparison.verdict} {relation} the baseline "
            f"({comparison.difference:+.3f}, 95% CI {comparison.low:+.3f} to "
            f"{comparison.high:+.3f}, p={comparison.p_value:.3g})"
        )
        needed = power_hint(gate, comparison)
        if needed > comparison.n:
            reasons.append(
                f"{gate.metric}: about {needed} items are needed to detect an improvement of "
                f"{gate.min_improvement:+.3f} with 80% power; this evaluation has {comparison.n}"
            )
    elif (gain := -comparison.difference if found.lower_is_better else comparison.difference) < (
        gate.min_improvement
    ):
        reasons.append(
            f"{gate.metric}: improves by {gain:+.3f}, less than the {gate.min_improvement:+.3f} "
            "asked"
        )
    worse = [
        name
        for name in gate.suites
        if (s := summary.get(name)) is not None
        and s.comparison is not None
        and s.comparison.verdict == "worse"
    ]
    missing = [name for name in gate.suites if name not in summary]
    if missing:
        reasons.append(f"suites not measured: {', '.join(missing)}")
    if len(worse) > gate.max_regressions:
        reasons.append(
            f"regressions on {', '.join(worse)} (at most {gate.max_regressions} allowed)"
        )
    return GateVerdict(not reasons, reasons, needed)


def power_hint(gate: Gate, comparison: Comparison) -> int:
    """Items a paired 0/1 comparison (McNemar's or the sign test) would need to detect the gate's
    `min_improvement` with 80% power, given the share of items the two disagreed on here; 0 for
    continuous graders or without a `min_improvement`."""
    if comparison.test == "paired-bootstrap" or comparison.n == 0:
        return 0
    discordance = (comparison.wins + comparison.losses) / comparison.n
    return items_needed(discordance, gate.min_improvement)
