"""The benchmarks' shared harness: every side in every round, who goes first rotating; a ratio
as its median and range."""

from __future__ import annotations

from benchmarks.harness import rotations, spread, warm_up


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
