"""LLM judges: replies are read strictly (no verdict is a fault, never a low score), a pairwise
judge's position bias shows as ties and inconsistency, a judge that reads the answers gives
consistent wins, and garbage fails the run naming the grader. Candidates and judges here are
external endpoints: a stub OpenAI-compatible server called with the real `openai` client."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from tests.evaluation.openai_stub import Stub, openai_stub
from tunefleet.core.graders import GraderError, grader
from tunefleet.evaluation.judges import (
    PAIRWISE_FIELDS,
    PAIRWISE_RUBRIC,
    SCORE_FIELDS,
    SCORE_RUBRIC,
    PairwiseJudge,
    ScoreJudge,
    check_rubric,
    parse_choice,
    parse_score,
    show_turns,
)
from tunefleet.evaluation.report import EvaluationFailed, Gate
from tunefleet.evaluation.runner import Candidate, Endpoint, EvalItem, Generator, run
from tunefleet.evaluation.statistics import mean_interval, wilson
from tunefleet.v1 import common_pb2, inference_pb2

GREEDY = inference_pb2.SamplingParams(max_tokens=16)
pytestmark = pytest.mark.timeout(300)


@pytest.fixture
def stub() -> Iterator[Stub]:
    with openai_stub() as running:
        yield running


def model(stub: Stub, name: str, key: str = "") -> Candidate:
    return Candidate(name, endpoint=Endpoint(stub.base_url, name, key))


def items(count: int) -> list[EvalItem]:
    turn = common_pb2.ChatMessage
    return [
        EvalItem(
            id=str(i),
            reference=f"word{i}",
            messages=(turn(role="user", content=f"Repeat: word{i}"),),
        )
        for i in range(count)
    ]


def test_replies_are_read_strictly() -> None:
    assert parse_score("Fine answer.\nRating: [[7]]", 1, 10) == pytest.approx(6 / 9)
    assert parse_score("[[3]] at first, then [[4.5]]", 0, 5) == pytest.approx(0.9)  # the last
    assert parse_score(" 10 ", 1, 10) == 1.0  # a bare verdict
    for bad in ("Seven out of ten", "[[eleven]]", "", "[[ ]]"):
        with pytest.raises(GraderError, match="no \\[\\[score\\]\\]"):
            parse_score(bad, 1, 10)
    with pytest.raises(GraderError, match="outside 1 to 10"):
        parse_score("[[11]]", 1, 10)
    assert [parse_choice(r) for r in ("[[A]]", "so [[ b ]]", "[[C]]", "tie", "A")] == [
        "A", "B", "tie", "tie", "A"
    ]  # fmt: skip
    for bad in ("Answer A is better", "[[D]]", "[[A or B]]"):
        with pytest.raises(GraderError, match="no \\[\\[A\\]\\]"):
            parse_choice(bad)


def test_rubrics_are_checked() -> None:
    check_rubric(SCORE_RUBRIC, SCORE_FIELDS, {"output"})
    check_rubric(PAIRWISE_RUBRIC, PAIRWISE_FIELDS, {"answer_a", "answer_b"})
    check_rubric("Is {output} polite? {{JSON}} [[1]] to [[{max}]]", SCORE_FIELDS, {"output"})
    with pytest.raises(ValueError, match="unknown fields \\['answer'\\]"):
        check_rubric("Grade {answer}", SCORE_FIELDS, {"output"})
    with pytest.raises(ValueError, match="missing"):
        check_rubric("Which is better, A or B? {input}", PAIRWISE_FIELDS, {"answer_a", "answer_b"})
    with pytest.raises(ValueError):
        check_rubric("Grade {output", SCORE_FIELDS, {"output"})
    with pytest.raises(ValueError, match="not a field name"):
        check_rubric("Grade {output.__class__}", SCORE_FIELDS, {"output"})
    turn = common_pb2.ChatMessage
    assert show_turns([turn(role="user", content="Hi")]) == "Hi"
    assert show_turns(
        [turn(role="system", content="Be brief"), turn(role="user", content="Hi")]
    ) == ("system: Be brief\n\nuser: Hi")


async def test_a_judge_that_always_answers_a_gives_only_ties(stub: Stub) -> None:
    judge = PairwiseJudge("pairwise", model(stub, "always-a"))
    outcome = await run(
        items(20),
        [model(stub, "mute"), model(stub, "parrot")],
        [judge],
        Generator(),
        GREEDY,
        baseline="mute",
    )
    found = outcome.summary["parrot"]["pairwise"]
    assert found.tally is not None and "pairwise" not in outcome.summary["mute"]
    assert (found.tally.wins, found.tally.losses, found.tally.ties) == (0, 0, 20)
    assert found.tally.inconsistency_rate == 1.0
    assert found.estimate.mean == 0.5
    assert found.comparison is not None
    assert found.comparison.verdict == "no significant difference"
    assert found.comparison.test == "sign-exact" and found.comparison.p_value == 1.0
    one = next(r for r in outcome.items if r.candidate == "parrot")
    assert one.judgements == {"pairwise/candidate_first": "A", "pairwise/baseline_first": "A"}


async def test_a_judge_that_reads_the_answers_gives_consistent_wins(stub: Stub) -> None:
    judge = PairwiseJudge("pairwise", model(stub, "by-content"))
    generator = Generator()
    outcome = await run(
        items(20),
        [model(stub, "mute"), model(stub, "parrot"), model(stub, "half")],
        [judge, ScoreJudge("rubric", model(stub, "by-content")), grader("exact_match")],
        generator,
        GREEDY,
        baseline="mute",
        gate=Gate("pairwise"),
    )
    parrot = outcome.summary["parrot"]["pairwise"]
    assert parrot.tally is not None and parrot.comparison is not None
    assert (parrot.tally.wins, parrot.tally.ties, parrot.tally.inconsistent) == (20, 0, 0)
    assert parrot.tally.win_rate.mean == 1.0 and parrot.tally.win_rate.low > 0.8
    assert parrot.comparison.verdict == "better"
    assert parrot.comparison.p_value == pytest.approx(2 * 0.5**20)
    half = outcome.summary["half"]["pairwise"]
    assert half.tally is not None
    assert (half.tally.wins, half.tally.losses, half.tally.ties) == (10, 0, 10)
    assert half.estimate.mean == 0.75
    assert outcome.gates["parrot"].passed and outcome.gates["half"].passed
    # The rubric judge agrees with exact match, item by item.
    assert outcome.summary["parrot"]["rubric"].estimate.mean == 1.0
    assert outcome.summary["mute"]["rubric"].estimate.mean == 0.0
    for result in outcome.items:
        assert result.scores["rubric"] == result.scores["exact_match"]
    # The judge answered greedily, and every item twice per compared candidate.
    judged = [r for r in stub.requests if r["model"] == "by-content"]
    assert len(judged) == 20 * 2 * 2 + 20 * 3
    assert {r["temperature"] for r in judged} == {0.0}
    await generator.close()


async def test_a_judge_without_verdicts_fails_the_run_naming_it(stub: Stub) -> None:
    candidates = [model(stub, "mute"), model(stub, "parrot")]
    judge = PairwiseJudge("pairwise", model(stub, "garbage"))
    with pytest.raises(
        EvaluationFailed, match="pairwise of parrot: no verdict for 20 of 20"
    ) as failed:
        await run(items(20), candidates, [judge], Generator(), GREEDY, baseline="mute")
    assert "I like turtles" in str(failed.value)
    rubric = ScoreJudge("rubric", model(stub, "garbage"))
    with pytest.raises(EvaluationFailed, match="grader rubric could not grade 20 of 20"):
        await run(items(20), candidates, [rubric], Generator(), GREEDY, baseline="mute")


async def test_a_judge_that_cannot_answer_is_a_fault_not_a_loss(stub: Stub) -> None:
    candidates = [model(stub, "mute"), model(stub, "parrot")]
    judge = PairwiseJudge("pairwise", model(stub, "broken"))
    with pytest.raises(EvaluationFailed, match="no verdict for 4 of 4") as failed:
        await run(items(4), candidates, [judge], Generator(), GREEDY, baseline="mute")
    assert "500" in str(failed.value)
    # The client retried (2 retries) before giving up on each call.
    assert sum(r["model"] == "broken" for r in stub.requests) == 4 * 2 * 3


async def test_faults_under_the_threshold_are_counted_not_scored(stub: Stub) -> None:
    candidates = [model(stub, "mute"), model(stub, "parrot")]
    judge = PairwiseJudge("pairwise", model(stub, "mostly-by-content"))
    outcome = await run(items(100), candidates, [judge], Generator(), GREEDY, baseline="mute")
    found = outcome.summary["parrot"]["pairwise"]
    assert found.tally is not None and found.comparison is not None
    assert (found.errors, found.tally.errors, found.tally.wins, found.estimate.n) == (1, 1, 99, 99)
    assert found.comparison.n == 99
    seven = next(r for r in outcome.items if r.candidate == "parrot" and r.index == 7)
    assert seven.scores["pairwise"] is None and "I like turtles" in seven.errors["pairwise"]


async def test_without_the_baselines_answer_there_is_nothing_to_compare(stub: Stub) -> None:
    candidates = [model(stub, "broken"), model(stub, "parrot")]
    judge = PairwiseJudge("pairwise", model(stub, "by-content"))
    with pytest.raises(EvaluationFailed, match="the baseline has no answer"):
        await run(items(2), candidates, [judge], Generator(), GREEDY, baseline="broken")


async def test_endpoints_get_their_key_and_the_sampling(stub: Stub) -> None:
    sampling = inference_pb2.SamplingParams(max_tokens=7, seed=3, stop=["\n"])
    outcome = await run(
        items(2),
        [model(stub, "parrot", key="sk-test")],
        [grader("exact_match")],
        Generator(),
        sampling,
        baseline="parrot",
    )
    assert outcome.summary["parrot"]["exact_match"].estimate.mean == 1.0
    # The items are asked concurrently: the requests arrive in any order.
    assert sorted(request["messages"][0]["content"] for request in stub.requests) == [
        "Repeat: word0",
        "Repeat: word1",
    ]
    for request in stub.requests:
        assert request["authorization"] == "Bearer sk-test"
        assert (request["max_tokens"], request["seed"], request["stop"]) == (7, 3, ["\n"])
        assert len(request["messages"]) == 1 and request["messages"][0]["role"] == "user"


async def test_clustered_items_get_cluster_robust_intervals(stub: Stub) -> None:
    # Pairs of items share a cluster (say, two questions on one passage); "half" is right on
    # one item of each pair, so within a cluster its outcomes cancel out.
    clustered = [
        dataclasses.replace(item, cluster=f"passage {int(item.id) // 2}") for item in items(20)
    ]
    outcome = await run(clustered, [model(stub, "half")], [grader("exact_match")], Generator(),
                        GREEDY, baseline="half")  # fmt: skip
    found = outcome.summary["half"]["exact_match"].estimate
    expected = mean_interval([1.0, 0.0] * 10, [f"passage {i // 2}" for i in range(20)])
    assert (found.mean, found.low, found.high) == (expected.mean, expected.low, expected.high)
    assert found.high - found.low < wilson(10, 20).high - wilson(10, 20).low
