"""Starts a blob write and stalls in the middle of it, to be killed by test_blobs.

Usage:
  python -m tests.storage.blob_writer local ROOT
  python -m tests.storage.blob_writer s3 ENDPOINT BUCKET
Prints "STALLED" once part of the blob is written (local: on disk; S3: one multipart part
uploaded), then sleeps until killed.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import boto3

from tunefleet.storage.blobs import BlobStore, LocalBlobStore, S3BlobStore

MiB = 1024 * 1024


def stall(*_: Any, **__: Any) -> None:
    print("STALLED", flush=True)
    time.sleep(3600)


def main(argv: list[str]) -> None:
    store: BlobStore
    if argv[0] == "local":
        store = LocalBlobStore(Path(argv[1]))
        writer = store.writer()
        writer.write(os.urandom(MiB))
        stall()
    else:
        client = boto3.client("s3", endpoint_url=argv[1], region_name="us-east-1")
        store = S3BlobStore(client, argv[2], prefix="tunefleet")
        parts = 0

        def after_part(**_: Any) -> None:
            nonlocal parts
            parts += 1
            if parts == 2:  # one part is stored, the upload is incomplete
                stall()

        client.meta.events.register("before-send.s3.UploadPart", after_part)
        store.put(os.urandom(MiB) for _ in range(24))  # above boto3's 8 MiB multipart threshold


if __name__ == "__main__":
    main(sys.argv[1:])
