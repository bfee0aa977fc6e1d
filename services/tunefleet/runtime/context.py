"""What a service needs from the process it runs in: settings, storage and a metrics registry."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from tunefleet.runtime.settings import ServiceKey, Settings, SettingsError
from tunefleet.storage import spools
from tunefleet.storage.blobs import BlobStore, LocalBlobStore, S3BlobStore
from tunefleet.storage.database import Database

log = logging.getLogger(__name__)


class Storage:
    """The metadata databases and the blob store a process uses: one database per service, or
    one they share (`storage.database_url` and `storage.databases`); each is connected to, and
    migrated to the newest schema, when a service of this process first asks for it."""

    def __init__(self, settings: Settings, blobs: BlobStore) -> None:
        self.settings, self.blobs = settings, blobs
        self._databases: dict[str, Database] = {}

    def database_for(self, service: ServiceKey | None) -> Database:
        """The database of `service`; None: the shared one."""
        own = self.settings.storage.databases.get(service) if service else None
        url = own or self.settings.database_url
        if url not in self._databases:
            database = Database(url, busy_timeout=self.settings.storage.sqlite_busy_timeout_seconds)
            database.migrate()
            self._databases[url] = database
        return self._databases[url]

    @property
    def database(self) -> Database:
        """The shared database (`storage.database_url`)."""
        return self.database_for(None)

    def close(self) -> None:
        for database in self._databases.values():
            database.close()
        self._databases.clear()


def open_storage(settings: Settings) -> Storage:
    """Connect to the configured blob store, clearing leftovers of writes a killed process never
    finished; the databases are opened as the services ask for them."""
    check_writable(settings)
    blobs: BlobStore
    if settings.storage.blob_backend == "s3":
        s3 = settings.storage.s3
        blobs = S3BlobStore.from_settings(s3.bucket, s3.prefix, s3.endpoint_url, s3.region)
    else:
        blobs = LocalBlobStore(settings.blob_dir)
    swept = blobs.sweep()
    if swept:
        log.info("removed %d unfinished blob writes", swept)
    for work in settings.work_dir.glob("*"):
        spools.sweep(work)  # uploads a killed process left behind
    return Storage(settings, blobs)


def check_writable(settings: Settings) -> None:
    """Refuse to start (SettingsError, one line) when the data folder cannot be written: the
    server would report SERVING and then fail every write."""
    folders = [settings.data_dir, settings.work_dir]
    if settings.storage.blob_backend == "local":
        folders.append(settings.blob_dir)
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".writable-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            raise SettingsError(
                f"data_dir: {folder} is not writable ({error.strerror}); tunefleet keeps its "
                "database, blobs and uploads in progress there"
            ) from None


@dataclass
class ServiceContext:
    settings: Settings
    storage: Storage
    registry: CollectorRegistry
    # The services this process serves (`tunefleet serve training` serves one); empty: unknown.
    services: tuple[str, ...] = ()
