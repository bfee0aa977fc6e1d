"""List filters: a small subset of AIP-160 that every List RPC shares.

    display_name = "sales"          equality
    display_name = "sales*"         prefix (a trailing * in a string)
    display_name != "draft"         inequality
    rating < 0                      comparison of a number (<, <=, >, >=)
    create_time > "2026-12-04T10:00:00Z"   comparison of a time (RFC 3339)
    labels.team = "ml"              a label's value
    labels.team:*                   the label is present
    a = "x" AND labels.b = "y"      conjunction

Anything else is INVALID_ARGUMENT on `filter`, naming what was not understood.
"""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from typing import Any, cast

from sqlalchemy import ColumnElement, DateTime, Select
from sqlalchemy.orm import InstrumentedAttribute

from tunefleet.core.errors import InvalidArgument

_TERM = re.compile(
    r"\s*(?P<field>[a-z_][a-z0-9_]*(?:\.[A-Za-z0-9_.\-/]+)?)\s*(?P<op>!=|<=|>=|=|<|>|:)\s*"
    # A bare value may be a resource name (adapters/a/versions/1, adapters/a@prod) or a prefix*.
    r'(?P<value>"(?:[^"\\]|\\.)*"|\*|[A-Za-z0-9_.\-/@]+\*?)\s*'
)
_AND = re.compile(r"\s+AND\s+")


class Filter:
    """The fields a List RPC can be filtered on: plain columns, and optionally labels."""

    def __init__(
        self,
        columns: dict[str, InstrumentedAttribute[Any] | ColumnElement[Any]],
        labels: InstrumentedAttribute[Any] | None = None,
    ) -> None:
        self.columns = columns
        self.labels = labels

    def apply(self, statement: Select[Any], text: str) -> Select[Any]:
        """`statement` narrowed by the filter `text` (empty: unchanged)."""
        if not text.strip():
            return statement
        for term in _AND.split(text.strip()):
            match = _TERM.fullmatch(term)
            if match is None:
                raise InvalidArgument("filter", f'cannot parse {term!r}; expected field = "value"')
            statement = statement.where(
                self._condition(match["field"], match["op"], match["value"])
            )
        return statement

    def _condition(self, field: str, op: str, raw: str) -> ColumnElement[bool]:
        try:
            value = json.loads(raw) if raw.startswith('"') else raw
        except ValueError as error:  # a bad escape, a control character in the string
            raise InvalidArgument(
                "filter", f"the string of {field} is not valid: {error}"
            ) from None
        if isinstance(value, str) and any(ord(c) < 32 or c == "\x7f" for c in value):
            raise InvalidArgument("filter", f"the string of {field} contains a control character")
        if field.startswith("labels.") and self.labels is not None:
            column = self.labels[field.removeprefix("labels.")].as_string()
            if op == ":":
                if value != "*":
                    raise InvalidArgument(
                        "filter", f"use {field}:* to test that a label is present"
                    )
                return cast(ColumnElement[bool], column.is_not(None))
        elif field in self.columns:
            column = self.columns[field]
        else:
            known = ", ".join(
                [*self.columns, *(["labels.<key>"] if self.labels is not None else [])]
            )
            raise InvalidArgument("filter", f"unknown field {field!r}; filterable: {known}")
        if op == ":":
            raise InvalidArgument("filter", f"{field} supports = and !=, not :")
        if op in ("<", "<=", ">", ">="):
            number: float | datetime
            try:
                if _is_time(column):
                    number = datetime.fromisoformat(value).astimezone(UTC)
                else:
                    number = float(value)
            except ValueError:
                kind = "an RFC 3339 time" if _is_time(column) else "a number"
                raise InvalidArgument("filter", f"{field} {op} needs {kind}") from None
            comparisons = {
                "<": column < number,
                "<=": column <= number,
                ">": column > number,
                ">=": column >= number,
            }
            return cast(ColumnElement[bool], comparisons[op])
        if op == "=" and isinstance(value, str) and value.endswith("*"):
            prefix = value[:-1].replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            return cast(ColumnElement[bool], column.like(prefix + "%", escape="\\"))
        return cast(ColumnElement[bool], column == value if op == "=" else column != value)


def _is_time(column: InstrumentedAttribute[Any] | ColumnElement[Any]) -> bool:
    kind = column.type
    return isinstance(getattr(kind, "impl_instance", kind), DateTime)
