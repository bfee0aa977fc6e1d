"""Preference data as other tools write it: DPO pairs (TRL, LLaMA-Factory, OpenAI) and KTO's
labelled answers become preference datasets, never silently SFT data."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.datasets.records import jsonl, sentence
from tunefleet.core.errors import InvalidArgument
from tunefleet.datasets.formats import FileFormat, Record, normalise_record
from tunefleet.datasets.pipeline import IngestOptions, Ingestor, IngestResult
from tunefleet.v1.dataset_pb2 import DatasetFormat, DatasetKind

SYSTEM = {"role": "system", "content": "Answer briefly."}


def user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def assistant(text: str) -> dict[str, str]:
    return {"role": "assistant", "content": text}


def pair(variant: str, question: str, good: str, bad: str) -> dict[str, Any]:
    """One preference pair in the layout of `variant`."""
    if variant == "trl":
        return {"prompt": question, "chosen": good, "rejected": bad}
    if variant == "trl_conversational":
        return {
            "prompt": [user(question)],
            "chosen": [assistant(good)],
            "rejected": [assistant(bad)],
        }
    if variant == "trl_implicit":
        return {
            "chosen": [SYSTEM, user(question), assistant(good)],
            "rejected": [SYSTEM, user(question), assistant(bad)],
        }
    if variant == "llamafactory_alpaca":
        return {"instruction": question, "input": "", "chosen": good, "rejected": bad}
    if variant == "llamafactory_sharegpt":
        return {
            "conversations": [{"from": "human", "value": question}],
            "chosen": {"from": "gpt", "value": good},
            "rejected": {"from": "gpt", "value": bad},
        }
    assert variant == "openai"
    return {
        "input": {"messages": [user(question)], "tools": [], "parallel_tool_calls": True},
        "preferred_output": [assistant(good)],
        "non_preferred_output": [assistant(bad)],
    }


def unpaired(variant: str, question: str, answer: str, good: bool) -> dict[str, Any]:
    if variant == "trl":
        return {"prompt": question, "completion": answer, "label": good}
    if variant == "trl_conversational":
        return {"prompt": [user(question)], "completion": [assistant(answer)], "label": good}
    assert variant == "llamafactory"
    turns = [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]
    return {"conversations": turns, "kto_tag": good}


PAIRS = [
    *("trl", "trl_conversational", "trl_implicit"),
    *("llamafactory_alpaca", "llamafactory_sharegpt", "openai"),
]
UNPAIRED = ["trl", "trl_conversational", "llamafactory"]


@pytest.mark.parametrize("variant", PAIRS)
def test_each_pair_variant_normalises_to_prompt_chosen_rejected(variant: str) -> None:
    file = FileFormat()
    record = normalise_record(pair(variant, "Capital of France?", "Paris.", "Lyon."), file)
    assert file.format == DatasetFormat.DATASET_FORMAT_PREFERENCE
    assert record.messages[-1] == user("Capital of France?")
    assert (record.chosen, record.rejected) == ([assistant("Paris.")], [assistant("Lyon.")])


@pytest.mark.parametrize("variant", UNPAIRED)
def test_each_unpaired_variant_normalises_with_its_label(variant: str) -> None:
    file = FileFormat()
    record = normalise_record(unpaired(variant, "2 + 2?", "5.", False), file)
    assert file.format == DatasetFormat.DATASET_FORMAT_UNPAIRED_PREFERENCE
    assert record == Record([user("2 + 2?")], completion=[assistant("5.")], desirable=False)


def ingest(items: list[Any], tmp_path: Path, **options: Any) -> IngestResult:
    ingestor = Ingestor(IngestOptions(validation_fraction=0, **options), tmp_path / "work")
    ingestor.feed(jsonl(items))
    return ingestor.finish()


def stored(result: IngestResult) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in result.records_path.read_bytes().splitlines()]


def questions(count: int, seed: int = 0) -> list[tuple[str, str, str]]:
    rng = random.Random(seed)
    return [(sentence(rng, 12), sentence(rng, 20), sentence(rng, 20)) for _ in range(count)]


@pytest.mark.parametrize("variant", PAIRS)
def test_a_file_of_pairs_is_a_preference_dataset(variant: str, tmp_path: Path) -> None:
    items = [pair(variant, q, good, bad) for q, good, bad in questions(40)]
    result = ingest(items, tmp_path)
    assert result.kind == DatasetKind.DATASET_KIND_PREFERENCE
    assert result.record_count == 40 and result.validation.rejected_records == 0
    first = stored(result)[0]
    assert first["chosen"][0]["role"] == "assistant" and first["rejected"] != first["chosen"]


@pytest.mark.parametrize("variant", UNPAIRED)
def test_a_file_of_labelled_answers_is_an_unpaired_preference_dataset(
    variant: str, tmp_path: Path
) -> None:
    items = [unpaired(variant, q, a, i % 3 != 0) for i, (q, a, _) in enumerate(questions(30))]
    result = ingest(items, tmp_path)
    assert result.kind == DatasetKind.DATASET_KIND_UNPAIRED_PREFERENCE
    records = stored(result)
    assert len(records) == 30 and sum(not r["desirable"] for r in records) == 10


def test_preference_data_becomes_sft_only_when_asked(tmp_path: Path) -> None:
    data = questions(30)
    pairs = ingest([pair("trl", *item) for item in data], tmp_path / "pairs", kind=1)
    assert pairs.kind == DatasetKind.DATASET_KIND_SFT and pairs.record_count == 30
    assert [m["content"] for m in stored(pairs)[0]["messages"]] == [data[0][0], data[0][1]]
    assert "rejected" not in stored(pairs)[0]
    labelled = [unpaired("trl", q, a, i % 3 != 0) for i, (q, a, _) in enumerate(data)]
    sft = ingest(labelled, tmp_path / "kto", kind=DatasetKind.DATASET_KIND_SFT)
    assert sft.record_count == 20 and sft.cleaning.undesirable_records_dropped == 10
    # KTO data read as prompt/completion: refused record by record, not trained on.
    forced = ingest(
        [*labelled[:5], {"prompt": "q", "completion": "a"}],
        tmp_path / "forced",
        format=DatasetFormat.DATASET_FORMAT_PROMPT_COMPLETION,
    )
    assert forced.record_count == 1 and forced.validation.rejected_records == 5
    assert {e.code for e in forced.validation.errors} == {"RECORD_ERROR_CODE_INCONSISTENT_FIELDS"}


def test_a_preference_kind_asked_of_sft_conversations_refuses_the_upload(tmp_path: Path) -> None:
    items = [{"prompt": q, "completion": a} for q, a, _ in questions(5)]
    with pytest.raises(InvalidArgument) as raised:
        ingest(items, tmp_path, kind=DatasetKind.DATASET_KIND_PREFERENCE)
    assert raised.value.field == "options.kind"


@pytest.mark.parametrize(
    ("record", "code", "field"),
    [
        ({"prompt": "q", "chosen": "same", "rejected": "same"}, "NO_PREFERENCE", "rejected"),
        ({"chosen": "a", "rejected": "b"}, "MISSING_FIELD", "prompt"),
        ({"prompt": "q", "completion": "a", "label": "yes"}, "UNKNOWN_FORMAT", "label"),
        (
            {"prompt": [user("q")], "chosen": [user("a")], "rejected": [assistant("b")]},
            "ROLE_ORDER",
            "chosen[0]",
        ),
    ],
)
def test_broken_preference_records_are_rejected_with_the_field(
    record: dict[str, Any], code: str, field: str, tmp_path: Path
) -> None:
    valid = (
        {"prompt": "x", "completion": "y", "label": True}
        if "label" in record
        else {"prompt": "x", "chosen": "y", "rejected": "z"}
    )
    result = ingest([record, valid], tmp_path)
    [error] = result.validation.errors
    assert (error.code, error.field) == (f"RECORD_ERROR_CODE_{code}", field)


def test_token_statistics_count_the_prompt_with_each_answer(
    tmp_path: Path, tokenizer_dir: Path
) -> None:
    from tunefleet.datasets.tokens import TokenCounter

    counter = TokenCounter(tokenizer_dir)
    items = [pair("trl", q, good, bad) for q, good, bad in questions(10)]
    ingestor = Ingestor(
        IngestOptions(validation_fraction=0, tokenizer_model=str(tokenizer_dir)),
        tmp_path / "work",
        count_tokens=counter,
    )
    ingestor.feed(jsonl(items))
    stats = ingestor.finish().token_statistics
    assert stats is not None
    sequences = [
        [user(q), assistant(answer)] for q, good, bad in questions(10) for answer in (good, bad)
    ]
    measured = counter(sequences)
    assert stats["total_tokens"] == sum(total for total, _ in measured)
    assert stats["trainable_tokens"] == sum(trainable for _, trainable in measured)
