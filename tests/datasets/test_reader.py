"""Splitting uploads into records as bytes arrive."""

from __future__ import annotations

import json

import pytest

from tests.datasets.records import chunks, jsonl, records
from tunefleet.datasets.reader import BOM, RawRecord, RecordReader, unsupported_kind


def read(data: bytes, chunk_size: int, max_record_bytes: int = 1_000_000) -> list[RawRecord]:
    reader = RecordReader(max_record_bytes)
    out = [record for chunk in chunks(data, chunk_size) for record in reader.feed(chunk)]
    return out + list(reader.finish())


@pytest.mark.parametrize("chunk_size", [1, 7, 4096, 10_000_000])
def test_json_lines_in_any_chunking(chunk_size: int) -> None:
    items = records("alpaca", 50)
    data = jsonl(items[:20]) + b"\n   \n" + jsonl(items[20:])
    result = read(data, chunk_size)
    assert [json.loads(r.text or "") for r in result] == items
    assert [r.line for r in result][:21] == [*range(1, 21), 23]


@pytest.mark.parametrize("chunk_size", [1, 3, 64, 10_000_000])
def test_json_array_in_any_chunking(chunk_size: int) -> None:
    items = records("openai_chat", 20)
    items[3]["messages"][1]["content"] = 'quotes " and brackets ]} and \\ backslashes'
    data = json.dumps(items, indent=2).encode()
    result = read(data, chunk_size)
    assert [json.loads(r.text or "") for r in result] == items
    assert result[0].line == 2  # indent=2 puts the first element on line 2


def test_line_numbers_count_multi_line_elements() -> None:
    data = b'[\n{"prompt": "a",\n "completion": "b"},\n{"prompt": "c", "completion": "d"}\n]'
    assert [r.line for r in read(data, 5)] == [2, 4]


def test_overlong_line_is_skipped_without_buffering_it() -> None:
    data = b'{"a": 1}\n{"a": "' + b"x" * 5000 + b'"}\n{"a": 3}\n'
    result = read(data, 100, max_record_bytes=1000)
    assert [(r.line, r.error) for r in result] == [(1, None), (2, "too_long"), (3, None)]


def test_unclosed_array_and_trailing_garbage() -> None:
    assert read(b'[{"a": 1}, {"b"', 4)[-1].error == "invalid_json: the array is not closed with ]"
    assert read(b'[{"a": 1}] trailing', 4)[-1].error == "invalid_json: data after the closing ]"


def test_invalid_utf8_is_reported_on_its_line() -> None:
    result = read(b'{"a": 1}\n{"a": "\xff"}\n', 3)
    assert result[1].line == 2 and (result[1].error or "").startswith("invalid_json: not UTF-8")


@pytest.mark.parametrize("chunk_size", [1, 2, 4096])
def test_a_byte_order_mark_is_skipped(chunk_size: int) -> None:
    items = records("alpaca", 3)
    assert [json.loads(r.text or "") for r in read(BOM + jsonl(items), chunk_size)] == items
    array = BOM + json.dumps(items, indent=1).encode()
    assert [json.loads(r.text or "") for r in read(array, chunk_size)] == items


@pytest.mark.parametrize(
    ("head", "kind"),
    [
        (b"PAR1\x15\x04\x15", "Parquet"),
        (b"\x1f\x8b\x08\x00", "gzip-compressed"),
        (b"PK\x03\x04\x14\x00", "a ZIP archive (or an .xlsx workbook)"),
        (b"instruction,input,output\nSay hi,,hi\n", "CSV (first line: 'instruction,input,output')"),
        (BOM + b"prompt\tcompletion\na\tb\n", "TSV (first line: 'prompt\\tcompletion')"),
    ],
)
def test_files_that_are_not_json_are_named(head: bytes, kind: str) -> None:
    assert unsupported_kind(head) == kind


@pytest.mark.parametrize(
    "head", [b'{"prompt": "a, b", "completion": "c"}\n', b"[\n  {", b"  \n{", b"not json\n"]
)
def test_json_or_unknown_text_is_left_to_the_record_checks(head: bytes) -> None:
    assert unsupported_kind(head) is None
