"""AdapterService's logic, free of gRPC: adapters and their versions (read, listed, deleted;
new ones through `versions.py`, uploads through `uploads.py`), aliases (`aliases.py`) and the
change feed that `WatchAdapterChanges` follows."""

from __future__ import annotations

import hashlib
import re
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from tunefleet.adapters import store
from tunefleet.adapters.aliases import Aliases
from tunefleet.adapters.store import TOPIC, AdapterRow, AliasRow, VersionDatasetRow, VersionRow
from tunefleet.adapters.uploads import VersionUpload
from tunefleet.adapters.versions import Hooks, RegistrySettings, Versions, check_lineage
from tunefleet.core import names
from tunefleet.core.errors import AlreadyExists, FailedPrecondition, InvalidArgument
from tunefleet.runtime.models import ModelCatalogue
from tunefleet.storage import idempotency, spools
from tunefleet.storage.blobs import BlobStore
from tunefleet.storage.changes import Change, append_change, latest_revision, read_changes
from tunefleet.storage.database import Database, utcnow
from tunefleet.storage.filtering import Filter
from tunefleet.storage.pagination import Page, paginate


class AdapterManager:
    def __init__(
        self,
        db: Database,
        blobs: BlobStore,
        *,
        workdir: Path,
        models: ModelCatalogue | None = None,
        settings: RegistrySettings | None = None,
        hooks: Hooks | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.db, self.blobs, self.workdir = db, blobs, workdir
        self.settings = settings or RegistrySettings()
        self.on_change = on_change or (lambda: None)
        self.aliases = Aliases(db, self.on_change)
        self.versions = Versions(
            db,
            blobs,
            workdir,
            models or ModelCatalogue(),
            self.settings,
            hooks or Hooks(),
            self.on_change,
        )

    def create_adapter(
        self,
        adapter_id: str,
        base_model: str,
        description: str,
        labels: dict[str, str],
        request_id: str = "",
    ) -> AdapterRow:
        names.check_id(adapter_id, "adapter_id")
        if not base_model:
            raise InvalidArgument("adapter.base_model", "is required")
        fingerprint = hashlib.sha256(
            repr((adapter_id, base_model, description, sorted(labels.items()))).encode()
        ).hexdigest()

        def create(session: Session) -> str:
            if session.get(AdapterRow, adapter_id) is not None:
                raise AlreadyExists(f"adapters/{adapter_id} already exists")
            now = utcnow()
            session.add(
                AdapterRow(
                    id=adapter_id,
                    base_model=base_model,
                    description=description,
                    labels=dict(labels),
                    latest_version=0,
                    create_time=now,
                    update_time=now,
                )
            )
            session.flush()
            append_change(
                session, TOPIC, "TYPE_ADAPTER_CREATED", {"adapter": f"adapters/{adapter_id}"}
            )
            return f"adapters/{adapter_id}"

        name, _ = idempotency.create_once(
            self.db,
            scope="CreateAdapter",
            request_id=request_id,
            request_sha256=fingerprint,
            create=create,
        )
        self.on_change()
        return self.get_adapter(name)

    def get_adapter(self, name: str) -> AdapterRow:
        with self.db.read() as session:
            return store.adapter(session, names.adapter_id(name))

    def list_adapters(self, filter_text: str, page_size: int, page_token: str) -> Page[AdapterRow]:
        adapter_filter = Filter({"base_model": AdapterRow.base_model}, labels=AdapterRow.labels)
        with self.db.read() as session:
            statement = adapter_filter.apply(select(AdapterRow), filter_text)
            return paginate(
                session,
                statement,
                [AdapterRow.id],
                page_size=page_size,
                page_token=page_token,
                query=filter_text,
            )

    def delete_adapter(self, name: str) -> None:
        adapter = names.adapter_id(name)
        with self.db.session() as session:
            store.adapter(session, adapter)
            aliases = session.scalars(
                select(AliasRow.alias).where(AliasRow.adapter_id == adapter)
            ).all()
            if aliases:
                listed = ", ".join(sorted(aliases))
                raise FailedPrecondition(
                    f"adapters/{adapter} has aliases ({listed}); delete them first",
                    reason="ADAPTER_HAS_ALIASES",
                )
            versions = session.scalars(
                select(VersionRow).where(VersionRow.adapter_id == adapter)
            ).all()
            shas = {f["sha256"] for v in versions for f in v.files["files"]}
            session.execute(delete(VersionRow).where(VersionRow.adapter_id == adapter))
            session.execute(delete(AdapterRow).where(AdapterRow.id == adapter))
            append_change(session, TOPIC, "TYPE_ADAPTER_DELETED", {"adapter": name})
        self._delete_unreferenced(shas)
        self.on_change()

    def begin_upload(
        self,
        parent: str,
        description: str,
        lineage: dict[str, Any],
        request_id: str = "",
        request_sha256: str = "",
    ) -> VersionUpload:
        adapter = names.adapter_id(parent, "header.parent")
        self.get_adapter(parent)
        staging = self.workdir / f"upload-{uuid.uuid4().hex}"
        staging.mkdir(parents=True)
        upload = VersionUpload(
            adapter,
            description,
            check_lineage(lineage),
            staging,
            self.settings.max_file_bytes,
            self.settings.max_version_bytes,
            request_id,
            request_sha256,
        )
        upload._owner = spools.hold(staging)
        return upload

    def existing_for(self, upload: VersionUpload) -> VersionRow | None:
        """The version an earlier upload with the same request id created, if any."""
        if not upload.request_id:
            return None
        request_id = idempotency.check_request_id(upload.request_id)
        with self.db.session() as session:
            name = idempotency.lookup(
                session, "UploadAdapterVersion", request_id, upload.request_sha256
            )
        return self.get_version(name) if name else None

    def finish_upload(self, upload: VersionUpload) -> VersionRow:
        upload.end_file()
        if not upload.files:
            raise InvalidArgument("file", "the upload contains no files")
        staged = {path: upload.staging / path for path in upload.files}
        return self.versions.register_files(
            upload.adapter,
            staged,
            None,
            upload.description,
            upload.lineage,
            scope=("UploadAdapterVersion", upload.request_id, upload.request_sha256),
        )

    def get_version(self, name: str, field: str = "name") -> VersionRow:
        ref = names.version_ref(name, field)
        with self.db.read() as session:
            return store.version(session, ref)

    def list_versions(
        self, parent: str, filter_text: str, page_size: int, page_token: str
    ) -> Page[VersionRow]:
        statement = select(VersionRow)
        if parent != "adapters/-":
            statement = statement.where(VersionRow.adapter_id == names.adapter_id(parent, "parent"))
        for term in filter(None, re.split(r"\s+AND\s+", filter_text.strip())):
            match = re.fullmatch(
                r'lineage\.(?P<field>\w+)\s*(?P<op>=|:)\s*"(?P<value>[^"]*)"', term
            )
            if match is None or (match["field"], match["op"]) not in (
                ("datasets", ":"),
                ("training_job", "="),
                ("base_model", "="),
            ):
                raise InvalidArgument(
                    "filter",
                    f"cannot filter on {term!r}; use "
                    'lineage.datasets:"datasets/x", lineage.training_job = "..." '
                    'or lineage.base_model = "..."',
                )
            if match["field"] == "datasets":
                statement = statement.where(
                    select(VersionDatasetRow)
                    .where(
                        VersionDatasetRow.adapter_id == VersionRow.adapter_id,
                        VersionDatasetRow.version == VersionRow.version,
                        VersionDatasetRow.dataset == match["value"],
                    )
                    .exists()
                )
            elif match["field"] == "training_job":
                statement = statement.where(VersionRow.training_job == match["value"])
            else:
                statement = statement.where(
                    VersionRow.lineage["base_model"].as_string() == match["value"]
                )
        with self.db.read() as session:
            return paginate(
                session,
                statement,
                [VersionRow.create_time, VersionRow.adapter_id, VersionRow.version],
                page_size=page_size,
                page_token=page_token,
                query=f"{parent}|{filter_text}",
                descending=True,
            )

    def delete_version(self, name: str) -> None:
        ref = names.version_ref(name)
        with self.db.session() as session:
            row = store.version(session, ref)
            aliases = session.scalars(
                select(AliasRow.alias).where(
                    AliasRow.adapter_id == row.adapter_id, AliasRow.version == row.version
                )
            ).all()
            if aliases:
                raise FailedPrecondition(
                    f"{names.version_name(row.adapter_id, row.version)} is the target of alias "
                    f"{', '.join(sorted(aliases))}; move or delete it first",
                    reason="VERSION_HAS_ALIASES",
                )
            shas = {f["sha256"] for f in row.files["files"]}
            session.delete(row)
            append_change(
                session,
                TOPIC,
                "TYPE_VERSION_DELETED",
                {
                    "adapter": f"adapters/{row.adapter_id}",
                    "version": names.version_name(row.adapter_id, row.version),
                },
            )
        self._delete_unreferenced(shas)
        self.on_change()

    def file_chunks(self, row: VersionRow, path: str) -> Iterator[bytes]:
        sha256 = next(f["sha256"] for f in row.files["files"] if f["path"] == path)
        return self.blobs.open(sha256)

    def _delete_unreferenced(self, shas: set[str]) -> None:
        if not shas:
            return
        with self.db.session() as session:
            used = {
                str(f["sha256"])
                for files in session.scalars(select(VersionRow.files))
                for f in files["files"]
            }
        for sha in shas - used:
            self.blobs.delete(sha)

    def latest_revision(self) -> int:
        """The revision of the newest change (0 before any)."""
        with self.db.read() as session:
            return latest_revision(session, TOPIC)

    def changes(self, after_revision: int, adapter: str = "", limit: int = 500) -> list[Change]:
        """Changes after a revision (of one adapter when given), oldest first."""
        with self.db.read() as session:
            changes = read_changes(session, TOPIC, after_revision, limit)
        if adapter:
            changes = [c for c in changes if c.payload.get("adapter") == adapter]
        return changes
