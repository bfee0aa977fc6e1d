"""The trainer's side of the blob store: reading its input data and keeping its checkpoints
there, so that a job whose Pod is lost resumes anywhere from its last checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

from tunefleet.runtime.settings import StorageSettings
from tunefleet.storage.blobs import BlobStore, LocalBlobStore, S3BlobStore, uri_sha256
from tunefleet.trainer.spec import SpecError

MANIFEST = "checkpoint.json"


def open_store(settings: StorageSettings, data_dir: Path) -> BlobStore:
    if settings.blob_backend == "s3":
        s3 = settings.s3
        return S3BlobStore.from_settings(s3.bucket, s3.prefix, s3.endpoint_url, s3.region)
    return LocalBlobStore(settings.blob_dir or data_dir / "blobs")


def fetch(uri: str, store: BlobStore | None, directory: Path) -> Path:
    """A local path for `uri`: a local path or file:// URI as is, a blob of the store (named by
    its sha256, as `store.uri()` writes it) copied and verified into `directory`."""
    if uri.startswith(("s3://", "blob:")) or (
        store is not None and uri.startswith("file://") and uri_sha256(uri)
    ):
        sha256 = uri_sha256(uri)
        if store is None or sha256 is None:
            raise SpecError(f"{uri!r} names a blob, but the spec has no storage to read it from")
        target = directory / sha256
        if not target.exists():
            directory.mkdir(parents=True, exist_ok=True)
            partial = target.with_suffix(".partial")
            with partial.open("wb") as out:
                for chunk in store.open(sha256):
                    out.write(chunk)
            partial.rename(target)
        return target
    return Path(uri.removeprefix("file://"))


def upload_checkpoint(store: BlobStore, checkpoint: Path) -> str:
    """Store every file of a checkpoint, then a manifest naming them; the manifest's URI."""
    files = {p.name: store.put_file(p).sha256 for p in sorted(checkpoint.iterdir()) if p.is_file()}
    manifest = json.dumps({"name": checkpoint.name, "files": files}, sort_keys=True).encode()
    return store.uri(store.put([manifest]).sha256)


def download_checkpoint(store: BlobStore, manifest_uri: str, directory: Path) -> Path:
    """Recreate a stored checkpoint under `directory`; its path."""
    sha256 = uri_sha256(manifest_uri)
    if sha256 is None:
        raise SpecError(f"resume_from: {manifest_uri!r} does not name a stored checkpoint")
    manifest = json.loads(store.read_bytes(sha256))
    target: Path = directory / str(manifest["name"])
    partial = directory / f".{manifest['name']}.download"
    partial.mkdir(parents=True, exist_ok=True)
    for name, sha256 in manifest["files"].items():
        with (partial / name).open("wb") as out:
            for chunk in store.open(sha256):
                out.write(chunk)
    if not target.exists():
        partial.rename(target)
    return target
