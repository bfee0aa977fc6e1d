"""The ingestion pipeline end to end, without gRPC."""

from __future__ import annotations

import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.datasets.records import (
    chinese,
    chunks,
    jsonl,
    perturb,
    perturb_character,
    records,
    sentence,
)
from tunefleet.datasets.pipeline import DatasetRejected, IngestOptions, Ingestor, IngestResult
from tunefleet.datasets.tokens import TokenCounter


def ingest(
    data: bytes, tmp_path: Path, options: IngestOptions | None = None, **kw: Any
) -> IngestResult:
    ingestor = Ingestor(options or IngestOptions(), tmp_path / "work", **kw)
    for chunk in chunks(data, 65_536):
        ingestor.feed(chunk)
    return ingestor.finish()


def final_records(result: IngestResult) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in result.records_path.read_bytes().splitlines()]


def test_a_json_array_reports_the_line_where_a_bad_element_starts(tmp_path: Path) -> None:
    items: list[Any] = records("alpaca", 6)
    items[4] = {"instruction": "no output"}
    data = orjson.dumps(items, option=orjson.OPT_INDENT_2)
    result = ingest(data, tmp_path)
    lines = data.decode().splitlines()
    [error] = result.validation.errors
    assert lines[error.line - 1].strip() == "{" and '"no output"' in lines[error.line]
    assert error.code == "RECORD_ERROR_CODE_MISSING_FIELD" and error.field == "output"


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"instruction,output\nSay hi,hi\n" * 50, "CSV"),
        (b"PAR1" + bytes(range(256)) * 40, "Parquet"),
    ],
)
def test_a_file_that_is_not_json_is_refused_whole(data: bytes, kind: str, tmp_path: Path) -> None:
    from tunefleet.datasets.pipeline import UnsupportedFileFormat

    with pytest.raises(UnsupportedFileFormat) as raised:
        ingest(data, tmp_path)
    assert raised.value.field == "file" and raised.value.reason == "UNSUPPORTED_FILE_FORMAT"
    assert f"looks like {kind}" in raised.value.message and "JSON lines" in raised.value.message


def near_duplicate_recall(
    tmp_path: Path, answer: Any, edit: Any, count: int = 50
) -> tuple[float, int]:
    """Of `count` long answers each uploaded beside a copy with one edit, the share of copies
    removed as near duplicates, and how many records remain."""
    rng = random.Random(5)
    items = []
    for index in range(count):
        text = answer(rng)
        items.append({"prompt": f"question {index}", "completion": text})
        items.append({"prompt": f"question {index}", "completion": edit(text, rng)})
    result = ingest(jsonl(items), tmp_path, IngestOptions(validation_fraction=0))
    return result.cleaning.near_duplicates_removed / count, result.record_count


def test_near_duplicates_in_chinese_are_found_as_well_as_in_english(tmp_path: Path) -> None:
    """Chinese has no spaces between words: its shingles are character 3-grams, so a
    one-character edit in a long answer is caught as often as a one-word edit in English."""
    english, kept_english = near_duplicate_recall(
        tmp_path / "en", lambda rng: " ".join(sentence(rng, 20) for _ in range(6)), perturb
    )
    han, kept_han = near_duplicate_recall(
        tmp_path / "zh", lambda rng: chinese(rng, 300), perturb_character
    )
    assert english >= 0.95 and han >= english - 0.05, (english, han)
    assert kept_english >= 50 and kept_han >= 50  # distinct answers are never merged


def test_one_bad_line_among_thousands(tmp_path: Path) -> None:
    lines = jsonl(records("alpaca", 3000)).splitlines()
    lines[1733] = b'{"instruction": "unterminated'
    result = ingest(b"\n".join(lines), tmp_path)
    report = result.validation
    assert (report.total_records, report.valid_records, report.rejected_records) == (3000, 2999, 1)
    assert [(e.line, e.code) for e in report.errors] == [(1734, "RECORD_ERROR_CODE_INVALID_JSON")]
    assert result.record_count == 2999


def test_each_format_ingests(tmp_path: Path) -> None:
    for index, kind in enumerate(("alpaca", "sharegpt", "openai_chat", "prompt_completion")):
        result = ingest(jsonl(records(kind, 200, seed=index)), tmp_path / kind)
        assert result.record_count == 200, kind
        assert all(r["messages"][-1]["role"] == "assistant" for r in final_records(result))


def test_reject_policy_and_empty_results(tmp_path: Path) -> None:
    data = jsonl(records("alpaca", 50)) + b"not json\n"
    with pytest.raises(DatasetRejected, match=r"1 of 51 records are invalid.*line 51"):
        ingest(data, tmp_path / "a", IngestOptions(invalid_record_policy="reject"))
    with pytest.raises(DatasetRejected, match="none of the 2 records is valid"):
        ingest(b"nope\n{}\n", tmp_path / "b")
    with pytest.raises(DatasetRejected, match="no records"):
        ingest(b"\n\n", tmp_path / "c")
    with pytest.raises(DatasetRejected, match="fewer than the minimum of 100"):
        ingest(data, tmp_path / "d", IngestOptions(min_record_count=100))


def test_planted_duplicates_are_found(tmp_path: Path) -> None:
    rng = random.Random(3)
    items = records("prompt_completion", 2000, seed=11)
    exact = [
        dict(items[i], prompt="  " + items[i]["prompt"].upper() + " ") for i in range(0, 200, 2)
    ]
    near = [
        dict(items[i], completion=perturb(items[i]["completion"], rng)) for i in range(1, 200, 2)
    ]
    data = jsonl(items + exact + near)
    result = ingest(data, tmp_path)
    cleaning = result.cleaning
    assert cleaning.exact_duplicates_removed == 100
    # Near duplicates: all 100 planted ones, and no clean record, are removed.
    assert cleaning.near_duplicates_removed == 100
    kept_lines = {r["source_line"] for r in final_records(result)}
    assert kept_lines == set(range(1, 2001))
    example = cleaning.near_duplicate_examples[0]
    assert example["removed_line"] > 2100 and example["similarity"] >= 0.8


def test_duplicates_kept_when_asked_stay_on_one_side(tmp_path: Path) -> None:
    rng = random.Random(5)
    items = records("alpaca", 400, seed=2)
    copies = [dict(items[i], output=perturb(items[i]["output"], rng)) for i in range(100)]
    options = IngestOptions(
        remove_exact_duplicates=False, remove_near_duplicates=False, validation_fraction=0.25
    )
    result = ingest(jsonl(items + copies), tmp_path, options)
    assert result.record_count == 500
    side = {r["source_line"]: r["split"] for r in final_records(result)}
    assert all(side[i + 1] == side[401 + i] for i in range(100))
    assert 115 <= result.validation_record_count <= 135


def test_split_is_seeded_and_deterministic(tmp_path: Path) -> None:
    data = jsonl(records("openai_chat", 1000, seed=9))
    first = ingest(data, tmp_path / "1", IngestOptions(split_seed=7))
    again = ingest(data, tmp_path / "2", IngestOptions(split_seed=7))
    other = ingest(data, tmp_path / "3", IngestOptions(split_seed=8))
    assert first.content_sha256 == again.content_sha256
    assert first.records_path.read_bytes() == again.records_path.read_bytes()
    assert first.content_sha256 != other.content_sha256
    assert (first.train_record_count, first.validation_record_count) == (900, 100)
    rerun = ingest(
        data, tmp_path / "4", replace(IngestOptions(split_seed=7), validation_fraction=0.2)
    )
    assert rerun.validation_record_count == 200


@pytest.mark.parametrize("policy", ["report", "redact", "drop"])
def test_pii_policies(tmp_path: Path, policy: str) -> None:
    items = records("alpaca", 20)
    items[4]["output"] += " Reach me at jo@example.org."
    items[9]["instruction"] += " My card is 4111 1111 1111 1111."
    result = ingest(jsonl(items), tmp_path, IngestOptions(pii_policy=policy))  # type: ignore[arg-type]
    counts = {c["type"]: c["count"] for c in result.cleaning.pii_counts}
    assert counts == {"PII_TYPE_EMAIL": 1, "PII_TYPE_CREDIT_CARD": 1}
    text = result.records_path.read_text()
    if policy == "report":
        assert "jo@example.org" in text and result.record_count == 20
    elif policy == "redact":
        assert "jo@example.org" not in text and "<EMAIL>" in text and "<CREDIT_CARD>" in text
        assert result.cleaning.pii_records_redacted == 2 and result.record_count == 20
        redacted = [r for r in final_records(result) if r["redacted_pii"]]
        assert {tuple(r["redacted_pii"]) for r in redacted} == {
            ("PII_TYPE_EMAIL",),
            ("PII_TYPE_CREDIT_CARD",),
        }
    else:
        assert result.cleaning.pii_records_dropped == 2 and result.record_count == 18
        assert "jo@example.org" not in text


def test_record_too_long(tmp_path: Path) -> None:
    items = records("prompt_completion", 10)
    items[2]["completion"] = "word " * 400
    result = ingest(jsonl(items), tmp_path, IngestOptions(max_record_chars=1000))
    assert [(e.line, e.code) for e in result.validation.errors] == [
        (3, "RECORD_ERROR_CODE_RECORD_TOO_LONG")
    ]


def test_token_statistics(tmp_path: Path, tokenizer_dir: Path) -> None:
    counter = TokenCounter(tokenizer_dir)
    items = records("openai_chat", 30)
    items[0]["messages"][2]["content"] = " ".join(["garden"] * 2000)
    options = IngestOptions(tokenizer_model=str(tokenizer_dir), max_sequence_length=1500)
    result = ingest(jsonl(items), tmp_path, options, count_tokens=counter)
    stats = result.token_statistics
    assert stats is not None
    assert stats["records_over_max_length"] == 1
    assert stats["tokens_per_record"]["max"] > 1500 > stats["tokens_per_record"]["p50"]
    assert 0 < stats["trainable_tokens"] < stats["total_tokens"]
    # Trainable tokens are exactly the assistant turns' tokens (plus their end marker).
    tokenizer = counter.tokenizer
    record = final_records(result)[1]["messages"]
    expected = len(
        tokenizer(record[2]["content"] + "<|end|>\n", add_special_tokens=False)["input_ids"]
    )
    assert counter([record])[0][1] == expected


def test_working_files_are_removed(tmp_path: Path) -> None:
    ingestor = Ingestor(IngestOptions(), tmp_path / "work")
    ingestor.feed(jsonl(records("alpaca", 10)))
    ingestor.close()
    assert not (tmp_path / "work").exists()


def test_unread_keys_are_counted_and_media_records_rejected(tmp_path: Path) -> None:
    items: list[Any] = records("alpaca", 30)
    for index, item in enumerate(items):
        item["id"] = index
        if index % 3 == 0:
            item["source"] = "web"
    items[7]["images"] = ["photo.jpg"]
    result = ingest(jsonl(items), tmp_path)
    assert result.validation.ignored_keys == [
        {"key": "id", "count": 29},
        {"key": "source", "count": 10},
    ]
    [error] = result.validation.errors
    assert (error.line, error.code, error.field) == (
        8,
        "RECORD_ERROR_CODE_UNSUPPORTED_MODALITY",
        "images",
    )
