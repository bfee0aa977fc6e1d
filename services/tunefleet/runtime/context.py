"""What a service needs from the process it runs in: settings, storage and a metrics registry."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from tunefleet.runtime.settings import Settings, SettingsError
from tunefleet.storage import spools
from tunefleet.storage.blobs import BlobStore, LocalBlobStore, S3BlobStore
from tunefleet.storage.database import Database

log = logging.getLogger(__name__)


@dataclass
class Storage:
    """The metadata database and the blob store a process uses."""

    database: Database
    blobs: BlobStore

    def close(self) -> None:
        self.database.close()


def open_storage(settings: Settings) -> Storage:
    """Connect to the configured database (migrating it to the newest schema) and blob store,
    clearing leftovers of writes a killed process never finished."""
    check_writable(settings)
    database = Database(
        settings.database_url, busy_timeout=settings.storage.sqlite_busy_timeout_seconds
    )
    database.migrate()
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
    return Storage(database, blobs)


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
