"""The statistics of an evaluation: a mean with its 95% interval per candidate and grader, and a
candidate against the baseline paired on the same items, with a verdict.

- 0/1 outcomes: Wilson's interval for a rate; for a paired difference the exact McNemar test and
  an interval consistent with it (Clopper-Pearson on the discordant pairs: the difference is
  (b - c) / n = (b + c) / n x (2 theta - 1), theta the share of discordant pairs the candidate
  wins), so the interval excludes 0 exactly when the test rejects at the same level.
- Continuous scores: the normal interval of the mean (cluster-robust when items carry a cluster
  id: items of one cluster are not independent), and a paired bootstrap of the mean difference.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist

LEVEL = 0.95


def _z(level: float) -> float:
    return NormalDist().inv_cdf(0.5 + level / 2)


@dataclass(frozen=True)
class Estimate:
    n: int
    mean: float
    low: float
    high: float


def wilson(successes: int, n: int, level: float = LEVEL) -> Estimate:
    """Wilson's score interval for a rate (good at 0, 1 and small n, unlike the normal one)."""
    if n == 0:
        return Estimate(0, math.nan, math.nan, math.nan)
    z = _z(level)
    rate = successes / n
    centre = (rate + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(rate * (1 - rate) / n + z * z / (4 * n * n))
    return Estimate(n, rate, max(0.0, centre - half), min(1.0, centre + half))


def mean_interval(
    values: Sequence[float], clusters: Sequence[str] | None = None, level: float = LEVEL
) -> Estimate:
    """The mean with a normal (CLT) interval; with `clusters`, the standard error is the
    cluster-robust one (sums of deviations per cluster, G/(G-1) corrected)."""
    n = len(values)
    if n == 0:
        return Estimate(0, math.nan, math.nan, math.nan)
    mean = sum(values) / n
    if n == 1:
        return Estimate(1, mean, math.nan, math.nan)
    if clusters is None or len(set(clusters)) == n:
        variance = sum((v - mean) ** 2 for v in values) / (n - 1)
        error = math.sqrt(variance / n)
    else:
        sums: dict[str, float] = defaultdict(float)
        for value, cluster in zip(values, clusters, strict=True):
            sums[cluster] += value - mean
        groups = len(sums)
        if groups < 2:
            return Estimate(n, mean, math.nan, math.nan)
        error = math.sqrt(groups / (groups - 1) * sum(s * s for s in sums.values())) / n
    z = _z(level)
    return Estimate(n, mean, mean - z * error, mean + z * error)


@dataclass(frozen=True)
class Comparison:
    """A candidate against the baseline on the same items."""

    n: int
    difference: float  # candidate minus baseline, mean over items
    low: float
    high: float
    p_value: float
    test: str  # "mcnemar-exact" or "paired-bootstrap"
    verdict: str  # "better", "worse" or "no significant difference"
    wins: int = 0  # 0/1 outcomes: items only the candidate got right
    losses: int = 0  # and only the baseline


def _verdict(low: float, high: float) -> str:
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    return "no significant difference"


def _binomial_two_sided(k: int, n: int) -> float:
    """The exact two-sided p-value of k successes in n fair coin flips."""
    if n == 0:
        return 1.0
    tail: float = sum(math.comb(n, i) for i in range(0, min(k, n - k) + 1)) / 2**n
    return min(1.0, 2 * tail)


def _clopper_pearson(k: int, n: int, level: float) -> tuple[float, float]:
    from scipy.stats import beta

    alpha = 1 - level
    low = 0.0 if k == 0 else float(beta.ppf(alpha / 2, k, n - k + 1))
    high = 1.0 if k == n else float(beta.ppf(1 - alpha / 2, k + 1, n - k))
    return low, high


def paired_binary(
    baseline: Sequence[bool], candidate: Sequence[bool], level: float = LEVEL
) -> Comparison:
    """Exact McNemar on the discordant items, and the interval of the difference it implies."""
    n = len(baseline)
    if n != len(candidate):
        raise ValueError("paired outcomes need the same items")
    wins = sum(1 for b, c in zip(baseline, candidate, strict=True) if c and not b)
    losses = sum(1 for b, c in zip(baseline, candidate, strict=True) if b and not c)
    discordant = wins + losses
    if n == 0:
        return Comparison(0, math.nan, math.nan, math.nan, 1.0, "mcnemar-exact", _verdict(0, 0))
    p_value = _binomial_two_sided(wins, discordant)
    if discordant == 0:
        low = high = 0.0
    else:
        theta_low, theta_high = _clopper_pearson(wins, discordant, level)
        share = discordant / n
        low, high = share * (2 * theta_low - 1), share * (2 * theta_high - 1)
    # The Clopper-Pearson bound passes 1/2 exactly where the doubled exact tail passes alpha:
    # the interval excludes 0 if and only if McNemar's exact test rejects.
    return Comparison(
        n,
        (wins - losses) / n,
        low,
        high,
        p_value,
        "mcnemar-exact",
        _verdict(low, high),
        wins,
        losses,
    )


def paired_bootstrap(
    baseline: Sequence[float],
    candidate: Sequence[float],
    level: float = LEVEL,
    resamples: int = 10_000,
    seed: int = 0,
) -> Comparison:
    """The mean difference with a percentile interval from resampling items (pairs kept), and
    the two-sided p-value of "no difference" from the same resamples."""
    n = len(baseline)
    if n != len(candidate):
        raise ValueError("paired scores need the same items")
    if n == 0:
        return Comparison(0, math.nan, math.nan, math.nan, 1.0, "paired-bootstrap", _verdict(0, 0))
    import numpy as np

    differences = np.array(candidate, dtype=np.float64) - np.array(baseline, dtype=np.float64)
    observed = float(differences.mean())
    rng = np.random.default_rng(seed)
    # Resampled in blocks: resamples x items indices at once could be large.
    block = max(1, 2_000_000 // n)
    means = np.sort(
        np.concatenate(
            [
                differences[rng.integers(0, n, size=(min(block, resamples - start), n))].mean(1)
                for start in range(0, resamples, block)
            ]
        )
    )
    alpha = 1 - level
    low = float(means[math.floor(alpha / 2 * (resamples - 1))])
    high = float(means[math.ceil((1 - alpha / 2) * (resamples - 1))])
    at_or_below = float((means <= 0).mean())
    at_or_above = float((means >= 0).mean())
    p_value = min(1.0, 2 * min(at_or_below, at_or_above))
    if not differences.any():
        low = high = 0.0
        p_value = 1.0
    return Comparison(n, observed, low, high, p_value, "paired-bootstrap", _verdict(low, high))


def items_needed(discordance: float, improvement: float, level: float = LEVEL) -> int:
    """About how many items a paired 0/1 comparison needs to detect `improvement` with 80% power
    when a share `discordance` of items differ between the two (Connor's approximation for
    McNemar's test)."""
    if improvement <= 0 or discordance <= 0:
        return 0
    discordance = max(discordance, improvement)
    z_alpha, z_beta = _z(level), NormalDist().inv_cdf(0.8)
    root = z_alpha * math.sqrt(discordance) + z_beta * math.sqrt(
        max(discordance - improvement**2, 0.0)
    )
    return math.ceil((root / improvement) ** 2)
