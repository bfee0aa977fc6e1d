"""Splits an uploaded file into raw records as its bytes arrive.

JSON lines and a single JSON array are both accepted; which one is decided by the first
non-blank byte (`[` starts an array), after a UTF-8 byte order mark if the file has one. Memory
stays bounded by the longest record: a record longer than `max_record_bytes` is skipped (reported
as RECORD_TOO_LONG) without being buffered. Line numbers are the file's physical lines, for a
JSON array too (the line where an element starts), so that an editor finds them.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

BOM = b"\xef\xbb\xbf"
# Files people upload by mistake, by their first bytes.
_MAGIC = (
    (b"PAR1", "Parquet"),
    (b"\x1f\x8b", "gzip-compressed"),
    (b"PK\x03\x04", "a ZIP archive (or an .xlsx workbook)"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed"),
    (b"BZh", "bzip2-compressed"),
)
SNIFF_BYTES = 4096


def unsupported_kind(head: bytes) -> str | None:
    """What a file that is neither JSON lines nor a JSON array looks like, from its first bytes
    (None when it may be JSON: a file of bad JSON lines is reported line by line)."""
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    text = head.removeprefix(BOM).lstrip()
    if not text or text[:1] in b"{[":
        return None
    first_line = text.split(b"\n", 1)[0].decode("utf-8", "replace").strip()
    for separator, kind in (("\t", "TSV"), (",", "CSV")):
        if separator in first_line and "{" not in first_line:
            return f"{kind} (first line: {first_line[:80]!r})"
    return None


@dataclass(frozen=True)
class RawRecord:
    """One record's JSON text, or why it could not be read."""

    line: (
        int  # 1-based line of the record's first byte (JSON lines: its line; array: element start)
    )
    text: str | None  # the JSON text, None when `error` is set
    error: str | None = None  # "too_long" or "invalid_json: <reason>"


class RecordReader:
    """Feed bytes with `feed`, collect records as they complete, then call `finish`."""

    def __init__(self, max_record_bytes: int) -> None:
        self.max_record_bytes = max_record_bytes
        self._buffer = bytearray()
        self._mode: str | None = None  # "lines" or "array"
        self._line = 1  # line number of the first byte in the buffer
        self._skipping = False  # discarding the rest of an over-long JSON line
        self._at_start = True  # a byte order mark may still come
        self._array = _ArrayState()
        self.bytes_read = 0

    def feed(self, chunk: bytes) -> Iterator[RawRecord]:
        self.bytes_read += len(chunk)
        self._buffer += chunk
        if self._at_start:
            if len(self._buffer) < len(BOM) and BOM.startswith(self._buffer):
                return  # maybe the start of a byte order mark: wait for the next bytes
            if self._buffer.startswith(BOM):
                del self._buffer[: len(BOM)]
            self._at_start = False
        if self._mode is None:
            stripped = self._buffer.lstrip()
            if not stripped:
                return
            self._mode = "array" if stripped[:1] == b"[" else "lines"
        if self._mode == "lines":
            yield from self._lines(final=False)
        else:
            yield from self._elements(final=False)

    def finish(self) -> Iterator[RawRecord]:
        if self._mode == "lines":
            yield from self._lines(final=True)
        elif self._mode == "array":
            yield from self._elements(final=True)

    # --- JSON lines ----------------------------------------------------------------------------

    def _lines(self, final: bool) -> Iterator[RawRecord]:
        start = 0
        buffer = self._buffer
        while True:
            end = buffer.find(b"\n", start)
            if end < 0:
                break
            if self._skipping:
                self._skipping = False
            else:
                record = self._line_record(bytes(buffer[start:end]))
                if record is not None:
                    yield record
            self._line += 1
            start = end + 1
        del buffer[:start]
        if final and buffer:
            if not self._skipping:
                record = self._line_record(bytes(buffer))
                if record is not None:
                    yield record
            buffer.clear()
        elif len(buffer) > self.max_record_bytes and not self._skipping:
            yield RawRecord(self._line, None, "too_long")
            self._skipping = True
            buffer.clear()
        elif self._skipping:
            buffer.clear()

    def _line_record(self, raw: bytes) -> RawRecord | None:
        if not raw.strip():
            return None
        if len(raw) > self.max_record_bytes:
            return RawRecord(self._line, None, "too_long")
        try:
            return RawRecord(self._line, raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            return RawRecord(self._line, None, f"invalid_json: not UTF-8 ({exc.reason})")

    # --- one JSON array ------------------------------------------------------------------------

    def _elements(self, final: bool) -> Iterator[RawRecord]:
        state, buffer = self._array, self._buffer
        position = state.resume
        while position < len(buffer) and not state.done:
            if state.element_start is None:
                # Between elements: skip whitespace, the opening '[' and commas.
                byte = buffer[position]
                if byte in b" \t\r\n":
                    self._line += byte == 0x0A
                    position += 1
                    continue
                if byte == ord("[") and not state.opened:
                    state.opened = True
                elif byte == ord(",") and state.expect_comma:
                    state.expect_comma = False
                elif byte == ord("]"):
                    state.done = True
                else:
                    state.begin(position, self._line, byte)
                if state.element_start is None:
                    position += 1
                    continue
            position = state.scan(buffer, position)
            if state.element_end is not None:
                assert state.element_start is not None
                raw = bytes(buffer[state.element_start : state.element_end])
                yield self._element_record(raw, state.element_line)
                self._line = state.line
                state.finish_element()
            elif position - state.element_start > self.max_record_bytes:
                # An array cannot be resynchronised without parsing what is skipped, so the rest
                # of the file is unreadable.
                yield RawRecord(state.element_line, None, "too_long")
                state.done = True
            else:
                break  # the element continues in the next chunk
        if state.done:
            if buffer[position:].strip():
                yield RawRecord(self._line, None, "invalid_json: data after the closing ]")
            buffer.clear()
            return
        # Keep only the unfinished element, and where its scan stopped.
        keep_from = state.element_start if state.element_start is not None else len(buffer)
        del buffer[:keep_from]
        state.resume = position - keep_from if state.element_start is not None else 0
        if state.element_start is not None:
            state.element_start = 0
        if final:
            line = state.element_line if state.element_start is not None else self._line
            yield RawRecord(line, None, "invalid_json: the array is not closed with ]")

    @staticmethod
    def _element_record(raw: bytes, line: int) -> RawRecord:
        try:
            return RawRecord(line, raw.decode("utf-8"))
        except UnicodeDecodeError as exc:
            return RawRecord(line, None, f"invalid_json: not UTF-8 ({exc.reason})")


class _ArrayState:
    """Where the scan of a JSON array stands: string and nesting state of the current element."""

    def __init__(self) -> None:
        self.opened = False
        self.done = False
        self.expect_comma = False
        self.element_start: int | None = None
        self.resume = 0  # where scanning continues when the next chunk arrives
        self.element_end: int | None = None
        self.element_line = 0
        self.line = 0
        self.depth = 0
        self.in_string = False
        self.scalar = False

    def begin(self, position: int, line: int, first_byte: int) -> None:
        self.element_start, self.element_end = position, None
        self.scalar = first_byte not in b'{["'
        self.element_line = self.line = line
        self.depth, self.in_string = 0, False

    def finish_element(self) -> None:
        self.element_start = self.element_end = None
        self.expect_comma = True

    def scan(self, buffer: bytearray, position: int) -> int:
        """Advance through the current element, jumping from one significant byte to the next;
        sets `element_end` when the element is complete. Returns where to resume."""
        if self.scalar:  # a bare scalar ends at a comma, the closing bracket or whitespace
            match = _SCALAR_END.search(buffer, position)
            if match is None:
                return len(buffer)
            self.element_end = match.start()
            return match.start()
        while True:
            pattern = _IN_STRING if self.in_string else _OUTSIDE
            match = pattern.search(buffer, position)
            if match is None:
                return len(buffer)
            at = match.start()
            byte = buffer[at]
            position = at + 1
            if byte == 0x0A:
                self.line += 1
            elif byte == 0x5C:  # backslash: skip the escaped byte, once it has arrived
                if at + 1 >= len(buffer):
                    return at
                position = at + 2
            elif byte == 0x22:
                self.in_string = not self.in_string
                if not self.in_string and self.depth == 0:
                    self.element_end = position
                    return position
            elif byte in b"[{":
                self.depth += 1
            else:  # ] or }
                self.depth -= 1
                if self.depth == 0:
                    self.element_end = position
                    return position


_IN_STRING = re.compile(rb'[\\"\n]')
_OUTSIDE = re.compile(rb'["\[\]{}\n]')
_SCALAR_END = re.compile(rb"[,\]\s]")
