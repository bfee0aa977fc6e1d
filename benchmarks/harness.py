"""What the benchmarks share, so that each compares its sides the same way:

- `rotations`: every round runs every side, and who goes first rotates from round to round, so
  that a machine growing busier or quieter (these machines are noisy) weighs on each side alike;
- a warm-up of each side before the rounds, printed and not counted (`warm_up`), so that no side
  pays the first run's imports, page cache and allocator growth alone;
- `spread`: a ratio over the rounds as its median and range, the range printed so that a
  reader sees how much one run can be trusted; no benchmark reports one lucky pair;
- `time_rounds` (and `time_rounds_async`): all of the above for sides that are functions to time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from typing import TypeVar

T = TypeVar("T")


def rotations(sides: Sequence[str], rounds: int) -> Iterator[tuple[int, list[str]]]:
    """(round number from 1, the sides in this round's order) for `rounds` rounds."""
    order = list(sides)
    for number in range(1, rounds + 1):
        yield number, order
        order = order[1:] + order[:1]


def warm_up(sides: Sequence[str], run: Callable[[str], T]) -> dict[str, T]:
    """Run each side once, not to be counted; their results, for a benchmark to print."""
    return {side: run(side) for side in sides}


def spread(values: Sequence[float], unit: str = "x") -> str:
    """`1.23x (1.10-1.35)`: the median of `values` and their range."""
    return f"{statistics.median(values):.2f}{unit} ({min(values):.2f}-{max(values):.2f})"


def time_rounds(
    sides: Mapping[str, Callable[[], object]], rounds: int, label: str
) -> dict[str, list[float]]:
    """Seconds each side took in each round, after one untimed call of each; every round printed."""
    warm_up(list(sides), lambda side: sides[side]())
    times: dict[str, list[float]] = {side: [] for side in sides}
    for number, order in rotations(list(sides), rounds):
        for side in order:
            started = time.perf_counter()
            sides[side]()
            times[side].append(time.perf_counter() - started)
        _print_round(label, number, order, times)
    return times


async def time_rounds_async(
    sides: Mapping[str, Callable[[], Awaitable[object]]], rounds: int, label: str
) -> dict[str, list[float]]:
    """`time_rounds` for coroutines."""
    for side in sides:
        await sides[side]()
    times: dict[str, list[float]] = {side: [] for side in sides}
    for number, order in rotations(list(sides), rounds):
        for side in order:
            started = time.perf_counter()
            await sides[side]()
            times[side].append(time.perf_counter() - started)
        _print_round(label, number, order, times)
    return times


def _print_round(label: str, number: int, order: list[str], times: dict[str, list[float]]) -> None:
    seconds = ", ".join(f"{side} {times[side][-1]:.3f} s" for side in order)
    print(f"  {label}, round {number}: {seconds}", flush=True)
