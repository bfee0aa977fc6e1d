"""The statistics of evaluations against scipy, and the comparisons a reviewer checks first:
a candidate right on the baseline's items and k more differs by k/n, significantly only when k
is large enough, with the interval and McNemar's test agreeing."""

from __future__ import annotations

import math
import random

import pytest
from scipy.stats import binomtest

from tunefleet.evaluation.statistics import (
    items_needed,
    mean_interval,
    paired_binary,
    paired_bootstrap,
    wilson,
)


@pytest.mark.parametrize(("k", "n"), [(0, 10), (3, 10), (10, 10), (47, 100), (1, 1000)])
def test_wilson_matches_scipy(k: int, n: int) -> None:
    reference = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    estimate = wilson(k, n)
    assert estimate.mean == k / n
    assert estimate.low == pytest.approx(reference.low, abs=1e-9)
    assert estimate.high == pytest.approx(reference.high, abs=1e-9)


@pytest.mark.parametrize("n", [20, 100])
def test_k_more_right_items_differ_by_k_over_n_and_significantly_only_for_large_k(n: int) -> None:
    rng = random.Random(n)
    baseline = [rng.random() < 0.5 for _ in range(n)]
    wrong = [i for i, right in enumerate(baseline) if not right]
    significant = []
    for k in range(0, min(len(wrong), 12) + 1):
        candidate = list(baseline)
        for index in wrong[:k]:
            candidate[index] = True
        result = paired_binary(baseline, candidate)
        assert result.difference == pytest.approx(k / n)
        assert (result.wins, result.losses) == (k, 0)
        # McNemar's exact test is a binomial test on the discordant items.
        expected_p = binomtest(k, k, 0.5).pvalue if k else 1.0
        assert result.p_value == pytest.approx(expected_p)
        assert result.low <= result.difference <= result.high
        assert (result.low > 0) == (result.p_value < 0.05) == (result.verdict == "better")
        significant.append(result.low > 0)
    # Six discordant wins and no loss is the first count a two-sided 5% test accepts.
    assert significant == [k >= 6 for k in range(len(significant))]


def test_mcnemar_counts_both_directions_and_matches_scipy() -> None:
    baseline = [True] * 30 + [False] * 30 + [True] * 12 + [False] * 3
    candidate = [True] * 30 + [False] * 30 + [False] * 12 + [True] * 3
    result = paired_binary(baseline, candidate)
    assert (result.wins, result.losses) == (3, 12)
    assert result.difference == pytest.approx(-9 / 75)
    assert result.p_value == pytest.approx(binomtest(3, 15, 0.5).pvalue)
    assert result.verdict == "worse" and result.high < 0
    # The interval of the difference is the exact (Clopper-Pearson) one of the wins' share.
    theta = binomtest(3, 15).proportion_ci(confidence_level=0.95, method="exact")
    assert result.low == pytest.approx(15 / 75 * (2 * theta.low - 1))
    assert result.high == pytest.approx(15 / 75 * (2 * theta.high - 1))


def test_identical_outcomes_are_no_difference() -> None:
    outcomes = [True, False, True]
    result = paired_binary(outcomes, outcomes)
    assert (result.difference, result.low, result.high, result.p_value) == (0, 0, 0, 1.0)
    assert result.verdict == "no significant difference"
    scores = paired_bootstrap([0.2, 0.5], [0.2, 0.5])
    assert scores.verdict == "no significant difference" and scores.p_value == 1.0


def test_mean_interval_is_the_normal_one_and_widens_for_clustered_items() -> None:
    values = [0.1, 0.4, 0.35, 0.8, 0.6, 0.2, 0.9, 0.3]
    estimate = mean_interval(values)
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    assert estimate.mean == pytest.approx(mean)
    assert estimate.high - mean == pytest.approx(1.959964 * sd / math.sqrt(len(values)), rel=1e-5)
    # Each item repeated 5 times in its own cluster: the repeats add no information, so the
    # cluster-robust interval stays as wide as the 8 items'; the naive one shrinks by sqrt(5).
    repeated = [v for v in values for _ in range(5)]
    clusters = [str(i) for i in range(len(values)) for _ in range(5)]
    naive = mean_interval(repeated)
    robust = mean_interval(repeated, clusters)
    assert naive.high - naive.mean < 0.5 * (estimate.high - estimate.mean)
    # The G/(G-1) correction with G = 8 against the n-1 of the plain variance: equal widths.
    assert robust.high - robust.mean == pytest.approx(estimate.high - estimate.mean, rel=1e-9)


def test_paired_bootstrap_finds_a_consistent_gain_and_no_gain_in_noise() -> None:
    rng = random.Random(3)
    baseline = [rng.random() for _ in range(200)]
    better = [b + 0.05 + rng.gauss(0, 0.02) for b in baseline]
    result = paired_bootstrap(baseline, better)
    assert result.verdict == "better" and result.low > 0.04 and result.p_value < 0.001
    noise = [b + rng.gauss(0, 0.05) for b in baseline]
    drift = sum(n - b for b, n in zip(baseline, noise, strict=True)) / 200
    unclear = paired_bootstrap(baseline, noise)
    assert unclear.difference == pytest.approx(drift)
    assert unclear.low < drift < unclear.high
    assert (unclear.verdict == "no significant difference") == (unclear.low <= 0 <= unclear.high)
    # Seeded: the same call, the same interval.
    assert paired_bootstrap(baseline, noise) == unclear


def test_items_needed_follows_connors_approximation() -> None:
    # 20% of items discordant, a 10-point improvement, 5% two-sided, 80% power.
    root = 1.959964 * math.sqrt(0.2) + 0.841621 * math.sqrt(0.2 - 0.01)
    assert items_needed(0.2, 0.1) == math.ceil((root / 0.1) ** 2) == 155
    assert items_needed(0.2, 0.0) == 0
