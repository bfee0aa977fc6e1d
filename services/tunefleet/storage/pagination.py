"""Pagination for every List RPC (AIP-158): page sizes, opaque page tokens, keyset queries.

A page token encodes the sort key of the last item returned and a fingerprint of the query it
belongs to, so a token used with another filter or parent is refused rather than silently
returning the wrong rows. Keyset pagination (WHERE (key) < (last key)) stays correct and fast
while rows are added between pages.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

from sqlalchemy import Select, literal, tuple_
from sqlalchemy.orm import InstrumentedAttribute, Session

from tunefleet.core.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000

T = TypeVar("T")


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of results; `next_page_token` is empty on the last page."""

    items: list[T]
    next_page_token: str


def check_page_size(page_size: int) -> int:
    """0 means the default; above the maximum is lowered to it; negative is an error."""
    if page_size < 0:
        raise InvalidArgument("page_size", f"must not be negative, got {page_size}")
    if page_size == 0:
        return DEFAULT_PAGE_SIZE
    return min(page_size, MAX_PAGE_SIZE)


def encode_page_token(last_key: Sequence[Any], query: str) -> str:
    document = {"k": [_encode_value(v) for v in last_key], "q": _fingerprint(query)}
    return base64.urlsafe_b64encode(json.dumps(document).encode()).decode().rstrip("=")


def decode_page_token(token: str, query: str) -> list[Any]:
    """The sort key a token carries; INVALID_ARGUMENT if it is malformed or from another query."""
    try:
        padded = token + "=" * (-len(token) % 4)
        document = json.loads(base64.urlsafe_b64decode(padded.encode()))
        key = [_decode_value(v) for v in document["k"]]
        fingerprint = document["q"]
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise InvalidArgument("page_token", "is not a token this server issued") from None
    if fingerprint != _fingerprint(query):
        raise InvalidArgument(
            "page_token", "belongs to a different query (parent or filter changed)"
        )
    return key


def paginate(
    session: Session,
    statement: Select[T],
    order_by: Sequence[InstrumentedAttribute[Any]],
    *,
    page_size: int,
    page_token: str,
    query: str = "",
    descending: bool = False,
) -> Page[T]:
    """Run `statement` (selecting one ORM entity) one page at a time, ordered by `order_by`,
    which must be unique per row (end it with the primary key). `query` identifies the filter and
    parent the token must be reused with."""
    size = check_page_size(page_size)
    key = tuple_(*order_by)
    if page_token:
        last = decode_page_token(page_token, query)
        if len(last) != len(order_by):
            raise InvalidArgument("page_token", "is not a token this server issued")
        bound = tuple_(*(literal(v, c.type) for v, c in zip(last, order_by, strict=True)))
        statement = statement.where(key < bound if descending else key > bound)
    ordering = [c.desc() if descending else c.asc() for c in order_by]
    rows = list(session.scalars(statement.order_by(*ordering).limit(size + 1)))
    if len(rows) <= size:
        return Page(rows, "")
    rows = rows[:size]
    last_key = [getattr(rows[-1], c.key) for c in order_by]
    return Page(rows, encode_page_token(last_key, query))


def _fingerprint(query: str) -> str:
    return hashlib.sha256(query.encode()).hexdigest()[:16]


def _encode_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return {"t": value.isoformat()}
    if isinstance(value, bool) or not isinstance(value, int | str | float):
        raise TypeError(f"cannot page on a {type(value).__name__} key")
    return value


def _decode_value(value: Any) -> Any:
    if isinstance(value, dict):
        return datetime.fromisoformat(value["t"])
    if isinstance(value, int | str | float) and not isinstance(value, bool):
        return value
    raise ValueError("bad key value")
