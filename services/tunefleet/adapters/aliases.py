"""Aliases of an adapter (`adapters/{adapter}/aliases/{alias}`): moved by compare-and-set,
each move recorded with who, why and its change-feed revision."""

from __future__ import annotations

from collections.abc import Callable

from sqlalchemy import select

from tunefleet.adapters import store
from tunefleet.adapters.store import TOPIC, AliasMoveRow, AliasRow, VersionRow
from tunefleet.core import names
from tunefleet.core.errors import Aborted, FailedPrecondition, InvalidArgument, NotFound
from tunefleet.storage.changes import append_change
from tunefleet.storage.database import Database, utcnow
from tunefleet.storage.pagination import Page, paginate


class Aliases:
    def __init__(self, db: Database, on_change: Callable[[], None]) -> None:
        self.db, self.on_change = db, on_change

    def aliases_of(self, adapter: str) -> dict[str, int]:
        with self.db.read() as session:
            rows = session.scalars(select(AliasRow).where(AliasRow.adapter_id == adapter))
            return {row.alias: row.version for row in rows}

    def aliases_pointing_at(self, row: VersionRow) -> list[str]:
        with self.db.read() as session:
            return list(
                session.scalars(
                    select(AliasRow.alias).where(
                        AliasRow.adapter_id == row.adapter_id, AliasRow.version == row.version
                    )
                )
            )

    def set_alias(
        self, name: str, version: str, reason: str, actor: str, expected_version: str | None = None
    ) -> AliasRow:
        adapter, alias = names.alias_name(name)
        target = names.version_ref(version, "version")
        if target.adapter != adapter:
            raise InvalidArgument("version", "must be a version of the alias's adapter")
        with self.db.session() as session:
            row = store.version(session, target)
            current = session.execute(
                select(AliasRow)
                .where(AliasRow.adapter_id == adapter, AliasRow.alias == alias)
                .with_for_update()
            ).scalar_one_or_none()
            before = names.version_name(adapter, current.version) if current else ""
            if expected_version is not None and expected_version != before:
                raise Aborted(
                    f"{name} points at {before or 'nothing'}, not {expected_version or 'nothing'}",
                    reason="ALIAS_MOVED",
                    metadata={"current_version": before},
                )
            now = utcnow()
            if current is None:
                current = AliasRow(
                    adapter_id=adapter,
                    alias=alias,
                    version=row.version,
                    update_time=now,
                    updated_by=actor,
                )
                session.add(current)
            else:
                current.version, current.update_time, current.updated_by = row.version, now, actor
            session.flush()
            change = append_change(
                session,
                TOPIC,
                "TYPE_ALIAS_MOVED",
                {
                    "adapter": f"adapters/{adapter}",
                    "alias": name,
                    "version": names.version_name(adapter, row.version),
                    "previous_version": before,
                },
            )
            session.add(
                AliasMoveRow(
                    adapter_id=adapter,
                    alias=alias,
                    from_version=int(before.rsplit("/", 1)[1]) if before else None,
                    to_version=row.version,
                    time=now,
                    actor=actor,
                    reason=reason,
                    revision=change.revision,
                )
            )
        self.on_change()
        return current

    def set_canary(self, name: str, canary: str, percent: int, reason: str, actor: str) -> AliasRow:
        """Send `percent` of the requests for alias `name` to the version of alias `canary` of
        the same adapter; `percent` 0 removes the canary."""
        adapter, alias = names.alias_name(name)
        if not 0 <= percent <= 99:
            raise InvalidArgument(
                "canary.percent", f"must be 1 to 99 (0 removes it), got {percent}"
            )
        if percent and not canary:
            raise InvalidArgument("canary.alias", "is required with a percent")
        if percent and canary == alias:
            raise InvalidArgument("canary.alias", "must be another alias than the one it splits")
        with self.db.session() as session:
            current = session.execute(
                select(AliasRow)
                .where(AliasRow.adapter_id == adapter, AliasRow.alias == alias)
                .with_for_update()
            ).scalar_one_or_none()
            if current is None:
                raise NotFound(f"{name} not found", metadata={"name": name})
            if percent and session.get(AliasRow, (adapter, canary)) is None:
                raise InvalidArgument(
                    "canary.alias", f"adapters/{adapter}/aliases/{canary} does not exist"
                )
            current.canary_alias = canary if percent else None
            current.canary_percent = percent
            current.update_time, current.updated_by = utcnow(), actor
            session.flush()
            split = {"alias": canary, "percent": percent} if percent else None
            change = append_change(
                session,
                TOPIC,
                "TYPE_ALIAS_CANARY_CHANGED",
                {
                    "adapter": f"adapters/{adapter}",
                    "alias": name,
                    "version": names.version_name(adapter, current.version),
                    "canary": split,
                },
            )
            session.add(
                AliasMoveRow(
                    adapter_id=adapter,
                    alias=alias,
                    from_version=current.version,
                    to_version=current.version,
                    time=current.update_time,
                    actor=actor,
                    reason=reason,
                    revision=change.revision,
                    canary_changed=True,
                    canary_alias=current.canary_alias,
                    canary_percent=percent,
                )
            )
        self.on_change()
        return current

    def delete_alias(self, name: str, reason: str, actor: str) -> None:
        adapter, alias = names.alias_name(name)
        with self.db.session() as session:
            current = session.execute(
                select(AliasRow)
                .where(AliasRow.adapter_id == adapter, AliasRow.alias == alias)
                .with_for_update()
            ).scalar_one_or_none()
            if current is None:
                raise NotFound(f"{name} not found")
            split = session.scalars(
                select(AliasRow).where(
                    AliasRow.adapter_id == adapter,
                    AliasRow.canary_alias == alias,
                    AliasRow.canary_percent > 0,
                )
            ).first()
            if split is not None:
                raise FailedPrecondition(
                    f"adapters/{adapter}/aliases/{split.alias} sends {split.canary_percent}% of "
                    f"its requests to {name}: remove that canary first",
                    reason="ALIAS_IS_A_CANARY",
                    metadata={"alias": f"adapters/{adapter}/aliases/{split.alias}"},
                )
            before = names.version_name(adapter, current.version)
            session.delete(current)
            change = append_change(
                session,
                TOPIC,
                "TYPE_ALIAS_DELETED",
                {"adapter": f"adapters/{adapter}", "alias": name, "previous_version": before},
            )
            session.add(
                AliasMoveRow(
                    adapter_id=adapter,
                    alias=alias,
                    from_version=current.version,
                    to_version=None,
                    time=utcnow(),
                    actor=actor,
                    reason=reason,
                    revision=change.revision,
                )
            )
        self.on_change()

    def list_aliases(self, parent: str, page_size: int, page_token: str) -> Page[AliasRow]:
        adapter = names.adapter_id(parent, "parent")
        with self.db.read() as session:
            store.adapter(session, adapter)
            return paginate(
                session,
                select(AliasRow).where(AliasRow.adapter_id == adapter),
                [AliasRow.alias],
                page_size=page_size,
                page_token=page_token,
                query=parent,
            )

    def list_moves(self, parent: str, page_size: int, page_token: str) -> Page[AliasMoveRow]:
        if "/aliases/" in parent:
            adapter, alias = names.alias_name(parent, "parent")
        else:
            adapter, alias = names.adapter_id(parent, "parent"), None
        statement = select(AliasMoveRow).where(AliasMoveRow.adapter_id == adapter)
        if alias is not None:
            statement = statement.where(AliasMoveRow.alias == alias)
        with self.db.read() as session:
            return paginate(
                session,
                statement,
                [AliasMoveRow.id],
                page_size=page_size,
                page_token=page_token,
                query=parent,
                descending=True,
            )
