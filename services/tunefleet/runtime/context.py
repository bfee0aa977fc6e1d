"""What a service needs from the process it runs in: settings, storage and a metrics registry."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from prometheus_client import CollectorRegistry

from tunefleet.runtime.settings import Settings
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
    database = Database(settings.database_url)
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
    return Storage(database, blobs)


@dataclass
class ServiceContext:
    settings: Settings
    storage: Storage
    registry: CollectorRegistry
    # The services this process serves (`tunefleet serve training` serves one); empty: unknown.
    services: tuple[str, ...] = ()
