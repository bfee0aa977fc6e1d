"""Assembles a server process: settings → logging → storage → services → gRPC server.

`tunefleet serve` runs all four services in one process (the embedded shape);
`tunefleet serve datasets` runs one (the cluster shape, one Deployment per service).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from tunefleet.runtime.logs import configure_logging
from tunefleet.runtime.server import TunefleetServer
from tunefleet.runtime.services import SERVICES, registration
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


async def serve(settings: Settings, service_keys: Sequence[str] = ()) -> None:
    """Run the named services (all four when empty) until SIGTERM or SIGINT."""
    configure_logging(settings.logging)
    keys = list(service_keys) or list(SERVICES)
    storage = open_storage(settings)
    try:
        server = TunefleetServer(settings.server, [registration(key) for key in keys])
        await server.serve_until_signal()
    finally:
        storage.close()
