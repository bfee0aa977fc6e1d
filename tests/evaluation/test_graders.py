"""Graders on fixed strings against their reference implementations and hand counts."""

from __future__ import annotations

import pytest

from tunefleet.core.graders import BY_NAME, GraderError, Item, grader, macro_f1
from tunefleet.evaluation.manager import build_graders
from tunefleet.v1 import evaluation_pb2


def score(kind: str, output: str, reference: str = "", **options: object) -> float:
    return grader(kind, **options).score(output, Item("1", reference))


def test_exact_match_and_string_checks() -> None:
    assert score("exact_match", " Paris\n", "Paris") == 1.0
    assert score("exact_match", "paris", "Paris") == 0.0
    assert score("string_check", "Paris", "Paris", operation="eq") == 1.0
    assert score("string_check", "Paris", "Rome", operation="ne") == 1.0
    assert score("string_check", "It is Paris.", "Paris", operation="like") == 1.0
    assert score("string_check", "It is PARIS.", "paris", operation="ilike") == 1.0
    assert score("string_check", "It is PARIS.", "paris", operation="like") == 0.0
    assert score("string_check", "order 1234", operation="regex", value=r"\d{4}") == 1.0
    assert score("string_check", "order 12", "", operation="regex", value=r"\d{4}") == 0.0
    with pytest.raises(GraderError, match="not a regular expression"):
        score("string_check", "x", "([", operation="regex")
    with pytest.raises(ValueError, match="unknown string_check operation"):
        grader("string_check", operation="startswith")


def test_normalised_string_checks_match_whole_words() -> None:
    def like(output: str, reference: str) -> float:
        return score("string_check", output, reference, operation="like", normalise=True)

    assert like("The capital of France is Paris.", "Paris") == 1.0
    assert like("It is New  Delhi!", "new delhi") == 1.0
    assert like("The answer is 13.", "3") == 0.0  # a number inside another is not the answer
    assert like("Parisian food", "Paris") == 0.0
    assert like("The answer: 3", "3") == 1.0
    assert like("Paris", "the Paris") == 1.0  # articles go on both sides
    assert score("string_check", "The PARIS", "paris", operation="eq", normalise=True) == 1.0
    assert score("string_check", "Rome", "paris", operation="ne", normalise=True) == 1.0
    with pytest.raises(GraderError, match="no words once normalised"):
        like("anything", "The.")
    with pytest.raises(ValueError, match="cannot normalise"):
        grader("string_check", operation="regex", value="x", normalise=True)


def test_json_validity_and_schema() -> None:
    assert score("json_valid", '{"a": 1}') == 1.0 and score("json_valid", "{a: 1}") == 0.0
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}},
        "required": ["city", "qty"],
    }
    assert score("json_schema", '{"city": "Berlin", "qty": 4}', schema=schema) == 1.0
    assert score("json_schema", '{"city": "Berlin", "qty": 0}', schema=schema) == 0.0
    assert score("json_schema", '{"city": "Berlin"}', schema=schema) == 0.0
    assert score("json_schema", "not json", schema=schema) == 0.0
    from jsonschema.exceptions import SchemaError

    with pytest.raises(SchemaError):
        grader("json_schema", schema={"type": "no-such-type"})


def test_token_f1_is_squads() -> None:
    # SQuAD's normalisation drops case, punctuation and articles: 3 common tokens of 4 and 3.
    assert score("token_f1", "The Eiffel tower, Paris!", "eiffel tower in paris") == pytest.approx(
        2 * (3 / 3) * (3 / 4) / (3 / 3 + 3 / 4)
    )
    assert score("token_f1", "a", "the") == 1.0  # both empty after normalisation
    assert score("token_f1", "Rome", "Paris") == 0.0


def test_bleu_and_chrf_are_sacrebleus_sentence_scores() -> None:
    import sacrebleu

    hypothesis = "The cat sat on the mat next to the dog."
    reference = "The cat was sitting on the mat beside the dog."
    assert score("bleu", hypothesis, reference) == pytest.approx(
        sacrebleu.sentence_bleu(hypothesis, [reference]).score / 100
    )
    assert score("chrf", hypothesis, reference) == pytest.approx(
        sacrebleu.sentence_chrf(hypothesis, [reference]).score / 100
    )
    assert score("bleu", reference, reference) == pytest.approx(1.0)
    assert score("bleu", "xyz qqq", reference) == 0.0
    assert 0 < score("bleu", hypothesis, reference) < score("chrf", hypothesis, reference) < 1


@pytest.mark.parametrize(
    ("output", "reference"),
    [
        ("The cat on the mat", "the cat sat on the mat"),
        ("b d a", "a b c d"),
        ("Kenji wants 4 lamps, shipped to Berlin!", "Ship 4 lamps to Kenji in Berlin."),
        ("", "nothing matches"),
        ("completely different words", "the reference answer"),
    ],
)
def test_rouge_l_agrees_with_rouge_score(output: str, reference: str) -> None:
    from rouge_score import rouge_scorer

    expected = rouge_scorer.RougeScorer(["rougeL"]).score(reference, output)["rougeL"].fmeasure
    assert score("rouge_l", output, reference) == pytest.approx(expected)


def test_rouge_l_counts_words_of_every_script() -> None:
    # rouge-score keeps [a-z0-9] only and would score this 0.
    assert score("rouge_l", "Grüße aus Köln", "viele Grüße aus Köln") == pytest.approx(6 / 7)


def test_classification_accuracy_and_macro_f1() -> None:
    predicted = ["spam", "ham", "spam", "spam", "ham", "ham"]
    expected = ["spam", "spam", "spam", "ham", "ham", "ham"]
    accuracy = [score("classification", p, e) for p, e in zip(predicted, expected, strict=True)]
    assert sum(accuracy) / len(accuracy) == pytest.approx(4 / 6)
    # spam: P 2/3, R 2/3; ham: P 2/3, R 2/3 -> macro F1 2/3. A label never predicted scores 0.
    assert macro_f1(predicted, expected) == pytest.approx(2 / 3)
    assert macro_f1(["a", "a", "a"], ["a", "b", "c"]) == pytest.approx((0.5 + 0 + 0) / 3)


def test_binary_and_continuous_graders_are_told_apart() -> None:
    assert grader("exact_match").binary and grader("json_valid").binary
    assert not grader("bleu").binary and not grader("token_f1").binary
    with pytest.raises(ValueError, match="unknown grader 'meteor'"):
        grader("meteor")


def test_every_grader_named_alone_is_one_a_job_can_use() -> None:
    # Settings (training.evaluation.graders) and `tunefleet eval create --grader` accept these.
    job = evaluation_pb2.EvaluationJob(
        candidates=[evaluation_pb2.EvaluationCandidate(name="base")],
        graders=[evaluation_pb2.EvaluationGrader(type=name) for name in BY_NAME],
    )
    assert [built.name for built in build_graders(job)] == list(BY_NAME)
