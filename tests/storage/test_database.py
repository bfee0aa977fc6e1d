"""Metadata store contract: the same tests on SQLite and on a real PostgreSQL."""

from __future__ import annotations

import hashlib
import threading
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from typing import TypeVar

import pytest
from sqlalchemy import BigInteger, String, inspect, select
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from tunefleet.core.errors import InvalidArgument
from tunefleet.storage.changes import append_change, latest_revision, read_changes
from tunefleet.storage.database import Database, UtcDateTime
from tunefleet.storage.filtering import Filter
from tunefleet.storage.idempotency import create_once
from tunefleet.storage.pagination import MAX_PAGE_SIZE, paginate

R = TypeVar("R")
FOUNDATION_TABLES = {"change_counters", "changes", "idempotency_keys", "alembic_version"}


def run_concurrently(count: int, work: Callable[[int], R]) -> list[R]:
    barrier = threading.Barrier(count)

    def start(index: int) -> R:
        barrier.wait()
        return work(index)

    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(start, range(count)))


def test_migrations_create_and_remove_the_schema(database_url: str) -> None:
    db = Database(database_url)
    db.migrate()
    assert set(inspect(db.engine).get_table_names()) >= FOUNDATION_TABLES
    db.migrate()  # already at head: nothing to do
    db.downgrade("base")
    assert set(inspect(db.engine).get_table_names()) <= {"alembic_version"}
    db.migrate()
    assert set(inspect(db.engine).get_table_names()) >= FOUNDATION_TABLES
    db.close()


def test_concurrent_migrations_from_several_processes(database_url: str) -> None:
    databases = [Database(database_url) for _ in range(3)]
    run_concurrently(3, lambda i: databases[i].migrate())
    assert set(inspect(databases[0].engine).get_table_names()) >= FOUNDATION_TABLES
    for database in databases:
        database.close()


def test_timestamps_come_back_as_utc(db: Database) -> None:
    with db.session() as session:
        written = append_change(session, "t", "created", {"n": 1}).create_time
    with db.session() as session:
        (change,) = read_changes(session, "t")
    assert change.create_time == written
    assert change.create_time.utcoffset() == timedelta(0)


def test_json_payloads_round_trip(db: Database) -> None:
    payload = {"name": "adapters/a", "labels": {"team": "ml"}, "rank": 16, "ok": True, "x": None}
    with db.session() as session:
        append_change(session, "t", "created", payload)
    with db.session() as session:
        assert read_changes(session, "t")[0].payload == payload


def test_change_revisions_are_gapless_and_ordered_under_concurrency(db: Database) -> None:
    def append_many(worker: int) -> list[int]:
        revisions = []
        for i in range(20):
            with db.session() as session:
                revisions.append(
                    append_change(session, "feed", "k", {"w": worker, "i": i}).revision
                )
        return revisions

    results = run_concurrently(4, append_many)
    assert sorted(r for rs in results for r in rs) == list(range(1, 81))
    with db.session() as session:
        changes = read_changes(session, "feed", after_revision=0)
        assert [c.revision for c in changes] == list(range(1, 81))
        # Each writer's own changes appear in the order it made them.
        for worker in range(4):
            mine = [c.payload["i"] for c in changes if c.payload["w"] == worker]
            assert mine == list(range(20))
        assert [c.revision for c in read_changes(session, "feed", after_revision=75)] == [
            76,
            77,
            78,
            79,
            80,
        ]
        assert latest_revision(session, "feed") == 80
        assert latest_revision(session, "other") == 0


def test_topics_are_numbered_independently(db: Database) -> None:
    with db.session() as session:
        assert append_change(session, "a", "k", {}).revision == 1
        assert append_change(session, "b", "k", {}).revision == 1
        assert append_change(session, "a", "k", {}).revision == 2


def test_a_failed_transaction_leaves_nothing(db: Database) -> None:
    with pytest.raises(RuntimeError), db.session() as session:
        append_change(session, "t", "k", {})
        raise RuntimeError("boom")
    with db.session() as session:
        assert read_changes(session, "t") == []
        assert append_change(session, "t", "k", {}).revision == 1


# --- idempotency -------------------------------------------------------------------------------


def creator(db: Database, calls: list[int]) -> Callable[[Session], str]:
    def create(session: Session) -> str:
        calls.append(1)
        change = append_change(session, "jobs", "created", {})
        return f"trainingJobs/{change.revision}"

    return create


def fingerprint(body: str) -> str:
    return hashlib.sha256(body.encode()).hexdigest()


def test_retry_with_the_same_request_id_returns_the_first_result(db: Database) -> None:
    calls: list[int] = []
    request_id = str(uuid.uuid4())
    first = create_once(
        db,
        scope="CreateTrainingJob",
        request_id=request_id,
        request_sha256=fingerprint("a"),
        create=creator(db, calls),
    )
    again = create_once(
        db,
        scope="CreateTrainingJob",
        request_id=request_id,
        request_sha256=fingerprint("a"),
        create=creator(db, calls),
    )
    assert first == ("trainingJobs/1", True)
    assert again == ("trainingJobs/1", False)
    assert len(calls) == 1
    other_scope = create_once(
        db,
        scope="CreateAdapter",
        request_id=request_id,
        request_sha256=fingerprint("a"),
        create=creator(db, calls),
    )
    assert other_scope == ("trainingJobs/2", True)


def test_no_request_id_always_creates(db: Database) -> None:
    calls: list[int] = []
    for _ in range(2):
        create_once(db, scope="s", request_id="", request_sha256="", create=creator(db, calls))
    assert len(calls) == 2


def test_request_id_reused_for_another_request_is_refused(db: Database) -> None:
    calls: list[int] = []
    request_id = str(uuid.uuid4())
    create_once(
        db,
        scope="s",
        request_id=request_id,
        request_sha256=fingerprint("a"),
        create=creator(db, calls),
    )
    with pytest.raises(InvalidArgument) as raised:
        create_once(
            db,
            scope="s",
            request_id=request_id,
            request_sha256=fingerprint("b"),
            create=creator(db, calls),
        )
    assert raised.value.field == "request_id" and raised.value.reason == "REQUEST_ID_REUSED"


def test_request_id_must_be_a_uuid(db: Database) -> None:
    with pytest.raises(InvalidArgument, match="request_id: 'retry-1' is not a UUID"):
        create_once(db, scope="s", request_id="retry-1", request_sha256="", create=creator(db, []))


def test_concurrent_retries_create_exactly_once(db: Database) -> None:
    calls: list[int] = []
    request_id = str(uuid.uuid4())
    results = run_concurrently(
        6,
        lambda _: create_once(
            db,
            scope="s",
            request_id=request_id,
            request_sha256=fingerprint("a"),
            create=creator(db, calls),
        ),
    )
    names = {name for name, _ in results}
    created = [was_created for _, was_created in results]
    assert len(names) == 1 and created.count(True) == 1
    with db.session() as session:
        assert latest_revision(session, "jobs") == 1


# --- pagination --------------------------------------------------------------------------------


class PageBase(DeclarativeBase):
    pass


class Item(PageBase):
    __tablename__ = "pagination_items"
    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    kind: Mapped[str] = mapped_column(String(16))
    create_time: Mapped[datetime] = mapped_column(UtcDateTime())


@pytest.fixture
def items(db: Database) -> Database:
    PageBase.metadata.create_all(db.engine)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    with db.session() as session:
        for i in range(50):
            # Pairs share a timestamp, so the id must break ties.
            session.add(
                Item(
                    id=i,
                    kind="even" if i % 2 == 0 else "odd",
                    create_time=start + timedelta(seconds=i // 2),
                )
            )
    return db


def list_items(db: Database, kind: str | None, page_size: int, token: str) -> tuple[list[int], str]:
    statement = select(Item)
    if kind:
        statement = statement.where(Item.kind == kind)
    with db.session() as session:
        page = paginate(
            session,
            statement,
            [Item.create_time, Item.id],
            page_size=page_size,
            page_token=token,
            query=f"kind={kind}",
            descending=True,
        )
        return [item.id for item in page.items], page.next_page_token


def test_pages_cover_every_row_once_in_order(items: Database) -> None:
    seen, token = [], ""
    while True:
        ids, token = list_items(items, None, 7, token)
        seen += ids
        if not token:
            break
    assert seen == list(range(49, -1, -1))


def test_rows_added_between_pages_do_not_shift_pages(items: Database) -> None:
    first, token = list_items(items, None, 10, "")
    with items.session() as session:
        session.add(Item(id=100, kind="odd", create_time=datetime(2030, 1, 1, tzinfo=UTC)))
    second, _ = list_items(items, None, 10, token)
    assert first == list(range(49, 39, -1))
    assert second == list(range(39, 29, -1))


def test_filters_apply_across_pages(items: Database) -> None:
    ids, token = list_items(items, "even", 20, "")
    more, last = list_items(items, "even", 20, token)
    assert ids + more == list(range(48, -1, -2)) and last == ""


def test_page_size_rules(items: Database) -> None:
    assert len(list_items(items, None, 0, "")[0]) == 50  # default page size (50) covers all
    with pytest.raises(InvalidArgument, match="page_size"):
        list_items(items, None, -1, "")
    assert MAX_PAGE_SIZE == 1000
    assert len(list_items(items, None, 10_000, "")[0]) == 50


def test_bad_page_tokens_are_refused(items: Database) -> None:
    _, token = list_items(items, "even", 5, "")
    with pytest.raises(InvalidArgument, match="page_token: belongs to a different query"):
        list_items(items, "odd", 5, token)
    with pytest.raises(InvalidArgument, match="page_token: is not a token this server issued"):
        list_items(items, "even", 5, "garbage!")


def test_filter_values_may_be_bare_resource_names_and_prefixes(items: Database) -> None:
    with items.session() as session:
        session.add(
            Item(id=200, kind="adapters/a/v1", create_time=datetime(2031, 1, 1, tzinfo=UTC))
        )
        session.add(
            Item(id=201, kind="adapters/a@prod", create_time=datetime(2031, 1, 1, tzinfo=UTC))
        )
    where = Filter({"kind": Item.kind})

    def matching(text: str) -> list[int]:
        with items.session() as session:
            return sorted(session.scalars(where.apply(select(Item.id), text)))

    assert matching("kind=adapters/a/v1") == [200]
    assert matching('kind="adapters/a/v1"') == [200]
    assert matching("kind = adapters/a@prod") == [201]
    assert matching("kind=adapters/*") == [200, 201]
    assert len(matching("kind=ev*")) == 25
    with pytest.raises(InvalidArgument, match="filter: cannot parse"):
        matching("kind=a b")
