"""The benchmarks' shared harness: every side in every round, who goes first rotating; a ratio
as its median and range."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from benchmarks.harness import rotations, spread, time_rounds, time_rounds_async, warm_up


def test_every_round_runs_every_side_and_each_side_leads_in_turn() -> None:
    rounds = list(rotations(["a", "b", "c"], 4))
    assert [number for number, _ in rounds] == [1, 2, 3, 4]
    assert [order for _, order in rounds] == [
        ["a", "b", "c"],
        ["b", "c", "a"],
        ["c", "a", "b"],
        ["a", "b", "c"],
    ]


def test_a_warm_up_runs_each_side_once() -> None:
    ran: list[str] = []

    def run(side: str) -> int:
        ran.append(side)
        return len(ran)

    assert warm_up(["a", "b"], run) == {"a": 1, "b": 2}
    assert ran == ["a", "b"]


def test_a_ratio_is_its_median_and_range() -> None:
    assert spread([1.5, 1.0, 2.25]) == "1.50x (1.00-2.25)"
    assert spread([0.38, 0.4], unit="") == "0.39 (0.38-0.40)"


def test_timed_rounds_warm_up_each_side_then_time_every_round(
    capsys: pytest.CaptureFixture[str],
) -> None:
    calls: list[str] = []
    times = time_rounds({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3, "x")
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert {side: len(seconds) for side, seconds in times.items()} == {"a": 3, "b": 3}
    assert all(t >= 0 for seconds in times.values() for t in seconds)
    printed = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0].strip() for line in printed] == [
        "x, round 1",
        "x, round 2",
        "x, round 3",
    ]


def test_timed_rounds_of_coroutines() -> None:
    calls: list[str] = []

    def side(name: str) -> Callable[[], Awaitable[None]]:
        async def run() -> None:
            calls.append(name)

        return run

    times = asyncio.run(time_rounds_async({"a": side("a"), "b": side("b")}, 2, "x"))
    assert calls == ["a", "b", "a", "b", "b", "a"]
    assert [len(seconds) for seconds in times.values()] == [2, 2]
