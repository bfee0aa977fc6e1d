"""The bundled general suite: 300 distinct questions whose answers are right (checked here by
other means than the code that wrote them) and survive the grader's normalisation."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from tunefleet.core.graders import Item, grader
from tunefleet.suites import general, jsonl, write_lm_eval_task


def test_the_general_suite_is_300_distinct_questions_in_four_groups() -> None:
    records = general()
    assert len(records) == 300 and general() == records  # the same every time
    questions = [r["messages"][0]["content"] for r in records]
    assert len(set(questions)) == 300
    groups = Counter(r["cluster"].split("/")[0] for r in records)
    assert groups == {"knowledge": 100, "reasoning": 110, "instructions": 65, "format": 25}
    assert all(
        r["messages"][1]["role"] == "assistant" and r["messages"][1]["content"] for r in records
    )
    assert [json.loads(line) for line in jsonl(records).splitlines()] == records


def test_the_answers_are_right() -> None:
    checked = 0
    for record in general():
        question, answer = (m["content"] for m in record["messages"])
        task = record["cluster"]
        if task == "reasoning/arithmetic":
            a, op, b = re.match(r"What is (\d+) (\+|-|times) (\d+)\?", question).groups()  # type: ignore[union-attr]
            expected = {"+": int(a) + int(b), "-": int(a) - int(b), "times": int(a) * int(b)}[op]
            assert answer == str(expected), question
        elif task == "reasoning/comparison":
            numbers = [int(n) for n in re.findall(r"\d+", question)]
            assert answer == str(max(numbers)) and numbers[0] != numbers[1]
        elif task == "reasoning/word":
            numbers = [int(n) for n in re.findall(r"\d+", question)]
            if "gets" in question:
                assert int(answer) == sum(numbers)
            elif "gives away" in question:
                assert int(answer) == numbers[0] - numbers[1]
            else:
                assert int(answer) == numbers[0] * numbers[1]
        elif task == "instructions/uppercase":
            assert answer == re.search(r"'(\w+)'", question).group(1).upper()  # type: ignore[union-attr]
        elif task == "instructions/backwards":
            word = re.search(r"'(\w+)'", question).group(1)  # type: ignore[union-attr]
            assert answer == "".join(reversed(word))
        elif task == "instructions/counting":
            text = re.search(r"'([a-z ]+)'", question).group(1)  # type: ignore[union-attr]
            assert answer == str(len(text.split()))
        elif task == "format/list":
            words = re.findall(r"words (\w+), (\w+) and (\w+)", question)[0]
            assert answer.split(", ") == sorted(words)
        elif task == "format/yes-no":
            number = int(re.search(r"\d+", question).group())  # type: ignore[union-attr]
            assert answer == ("yes" if number % 2 == 0 else "no")
        elif task == "format/json":
            assert set(json.loads(answer)) == {"capital"}
        else:
            assert task.startswith("knowledge/")
            checked -= 1
        checked += 1
    assert checked == 200  # every question but the 100 of knowledge, which are facts


def test_every_answer_passes_the_normalised_graders_and_distinguishes() -> None:
    exact = grader("exact_match", normalise=True)
    words = grader("string_check", operation="like", normalise=True)
    for record in general():
        answer = record["messages"][1]["content"]
        item = Item("x", answer)
        assert exact.score(answer, item) == 1.0
        assert exact.score(f" {answer.lower()}. ", item) == 1.0  # case and punctuation
        assert exact.score("I do not know", item) == 0.0
        assert words.score(f"The answer is {answer}.", item) == 1.0  # said in a sentence
        # (Not "I do not know": the word "I" is iodine's answer. Whole-word matching is lenient
        # with one-letter answers; the comparison with a baseline on the same items is fair.)
        assert words.score("Unknown.", item) == 0.0


def test_the_lm_eval_task_reads_the_suite_and_grades_as_tunefleet_does(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """lm-evaluation-harness itself loads the written task: the same 300 questions and answers,
    and its exact match agrees with `exact_match` + `normalise` on answers as models write
    them."""
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    from lm_eval.tasks import TaskManager

    write_lm_eval_task(tmp_path / "task")
    task = TaskManager(include_path=str(tmp_path / "task")).load(["tunefleet_general"])["tasks"][
        "tunefleet_general"
    ]
    docs = list(task.eval_docs)
    records = general()
    assert len(docs) == 300
    exact = grader("exact_match", normalise=True)
    for doc, record in zip(docs, records, strict=True):
        question, answer = (m["content"] for m in record["messages"])
        assert task.doc_to_text(doc) == question and task.doc_to_target(doc) == answer
        for written in (answer, f" {answer.upper()}.\n", f"The {answer}", "I do not know"):
            ours = exact.score(written, Item("x", answer))
            theirs = task.process_results(doc, [written])["exact_match"]
            assert theirs == ours, (written, answer)
