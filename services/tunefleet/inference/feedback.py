"""Responses and the feedback on them, kept for the retraining loop.

Every response is recorded (its request, text and the version that produced it) by a background
writer that commits them in batches, so that the request path never waits for the database.
Feedback names a response id; the version comes from the recorded response.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Float, String, select
from sqlalchemy.orm import Mapped, mapped_column

from tunefleet.core.errors import InvalidArgument, NotFound
from tunefleet.storage import idempotency
from tunefleet.storage.database import Base, Database, utcnow
from tunefleet.storage.filtering import Filter
from tunefleet.storage.pagination import Page, paginate

log = logging.getLogger(__name__)


class ResponseRow(Base):
    __tablename__ = "inference_responses"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    adapter_version: Mapped[str] = mapped_column(String(256))
    request: Mapped[dict[str, Any]]
    text: Mapped[str]
    finish_reason: Mapped[str] = mapped_column(String(16))
    create_time: Mapped[datetime] = mapped_column(index=True)


class FeedbackRow(Base):
    __tablename__ = "feedback"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    response_id: Mapped[str] = mapped_column(String(64))
    rating: Mapped[float] = mapped_column(Float)
    corrected_text: Mapped[str]
    comment: Mapped[str]
    adapter_version: Mapped[str] = mapped_column(String(256), index=True)
    create_time: Mapped[datetime] = mapped_column(index=True)


LIST_FILTER = Filter(
    {
        "adapter_version": FeedbackRow.adapter_version,
        "rating": FeedbackRow.rating,
        "create_time": FeedbackRow.create_time,
    }
)


@dataclass(frozen=True)
class Feedback:
    response_id: str
    rating: float
    corrected_text: str = ""
    comment: str = ""


def _storable(value: Any) -> Any:
    """`value` with its NUL characters as U+FFFD: PostgreSQL's text and JSON cannot hold them,
    and one such response would hold back every response recorded after it. (A prompt may carry
    one, and a byte-level tokenizer may generate one.)"""
    if isinstance(value, str):
        return value.replace("\x00", "\ufffd")
    if isinstance(value, dict):
        return {_storable(k): _storable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_storable(item) for item in value]
    return value


class ResponseLog:
    def __init__(self, db: Database, flush_seconds: float = 0.2) -> None:
        self.db = db
        self.flush_seconds = flush_seconds
        self._pending: list[ResponseRow] = []
        self._flushing = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None

    def record(
        self, response_id: str, version: str, request: dict[str, Any], text: str, finish: str
    ) -> None:
        self._pending.append(
            ResponseRow(
                id=response_id,
                adapter_version=version,
                request=_storable(request),
                text=_storable(text),
                finish_reason=finish,
                create_time=utcnow(),
            )
        )

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="response-log")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.flush()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.flush_seconds)
            try:
                await self.flush()
            except Exception:
                log.exception("recording responses failed; retrying")

    async def flush(self) -> None:
        """Write what is pending; returns once every response recorded before the call is
        stored (a flush under way in the background included)."""
        async with self._flushing:
            rows, self._pending = self._pending, []
            if rows:
                try:
                    await asyncio.to_thread(self._write, rows)
                except Exception:
                    self._pending[:0] = rows
                    raise

    def _write(self, rows: list[ResponseRow]) -> None:
        with self.db.session() as session:
            session.add_all(rows)

    async def create_feedback(
        self, feedback: Feedback, request_id: str = ""
    ) -> tuple[FeedbackRow, bool]:
        """The recorded feedback, and whether it was recorded now (not by an earlier retry)."""
        if not feedback.response_id:
            raise InvalidArgument("feedback.response_id", "is required")
        if not -1.0 <= feedback.rating <= 1.0:
            raise InvalidArgument("feedback.rating", "must be between -1 and 1")
        await self.flush()  # the response may still be waiting to be written
        fingerprint = hashlib.sha256(repr(feedback).encode()).hexdigest()

        def create(session: Any) -> str:
            response = session.get(ResponseRow, feedback.response_id)
            if response is None:
                raise NotFound(
                    f"no response {feedback.response_id!r} was recorded",
                    metadata={"response_id": feedback.response_id},
                )
            identifier = uuid.uuid4().hex
            session.add(
                FeedbackRow(
                    id=identifier,
                    response_id=feedback.response_id,
                    rating=feedback.rating,
                    corrected_text=_storable(feedback.corrected_text),
                    comment=_storable(feedback.comment),
                    adapter_version=response.adapter_version,
                    create_time=utcnow(),
                )
            )
            session.flush()
            return identifier

        def run() -> tuple[FeedbackRow, bool]:
            identifier, created = idempotency.create_once(
                self.db,
                scope="CreateFeedback",
                request_id=request_id,
                request_sha256=fingerprint,
                create=create,
            )
            with self.db.session() as session:
                row = session.get(FeedbackRow, identifier)
                assert row is not None
                session.expunge(row)
                return row, created

        return await asyncio.to_thread(run)

    async def list_feedback(
        self, filter_text: str, page_size: int, page_token: str, with_responses: bool = False
    ) -> tuple[Page[FeedbackRow], dict[str, ResponseRow]]:
        """A page of feedback, newest first, and (`with_responses`) the judged responses by
        id."""

        def run() -> tuple[Page[FeedbackRow], dict[str, ResponseRow]]:
            with self.db.read() as session:
                page = paginate(
                    session,
                    LIST_FILTER.apply(select(FeedbackRow), filter_text),
                    [FeedbackRow.create_time, FeedbackRow.id],
                    page_size=page_size,
                    page_token=page_token,
                    query=filter_text,
                    descending=True,
                )
                responses: dict[str, ResponseRow] = {}
                if with_responses and page.items:
                    ids = {row.response_id for row in page.items}
                    found = session.scalars(select(ResponseRow).where(ResponseRow.id.in_(ids)))
                    responses = {row.id: row for row in found}
                for row in [*page.items, *responses.values()]:
                    session.expunge(row)
                return page, responses

        return await asyncio.to_thread(run)
