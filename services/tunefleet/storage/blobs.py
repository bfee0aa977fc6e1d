"""Content-addressed blob storage for datasets, adapters and checkpoints.

Blobs are named by the sha256 of their content, written in chunks (never whole in memory),
become visible atomically when complete, and are verified against their name when read. Two
backends share the `BlobStore` interface: a local directory (the embedded default) and any
S3-compatible object store.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

from tunefleet.core.errors import DataLoss, InvalidArgument, NotFound

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

CHUNK_BYTES = 1024 * 1024
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_URI_SHA256 = re.compile(r"([0-9a-f]{64})$")


@dataclass(frozen=True)
class BlobInfo:
    """A stored blob: its content hash (lowercase hex sha256) and size in bytes."""

    sha256: str
    size: int


def uri_sha256(uri: str) -> str | None:
    """The blob a URI written by `BlobStore.uri` names (its last 64 hex digits), if any."""
    match = _URI_SHA256.search(uri)
    return match[1] if match else None


def check_sha256(sha256: str, field: str = "sha256") -> str:
    """Return `sha256` if it is 64 lowercase hex digits, else raise InvalidArgument."""
    if not _SHA256.match(sha256):
        raise InvalidArgument(field, f"{sha256!r} is not a lowercase hex sha256 digest")
    return sha256


class BlobWriter(ABC):
    """Receives a blob's bytes chunk by chunk; `commit` makes it visible, `abort` discards it.

    Use as a context manager: leaving the block without `commit` aborts.
    """

    def __init__(self) -> None:
        self._hash = hashlib.sha256()
        self.size = 0
        self._done = False

    def write(self, chunk: bytes) -> None:
        if self._done:
            raise RuntimeError("blob writer already finished")
        self._hash.update(chunk)
        self.size += len(chunk)
        self._write(chunk)

    def commit(self, expected_sha256: str | None = None) -> BlobInfo:
        """Publish the blob. With `expected_sha256`, a mismatch aborts and raises DataLoss."""
        info = BlobInfo(self._hash.hexdigest(), self.size)
        if expected_sha256 is not None and expected_sha256 != info.sha256:
            self.abort()
            raise DataLoss(
                f"content has sha256 {info.sha256}, expected {expected_sha256}",
                reason="CHECKSUM_MISMATCH",
                metadata={"expected_sha256": expected_sha256, "actual_sha256": info.sha256},
            )
        self._done = True
        self._publish(info)
        return info

    def abort(self) -> None:
        if not self._done:
            self._done = True
            self._discard()

    def __enter__(self) -> BlobWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.abort()

    @abstractmethod
    def _write(self, chunk: bytes) -> None: ...

    @abstractmethod
    def _publish(self, info: BlobInfo) -> None: ...

    @abstractmethod
    def _discard(self) -> None: ...


class BlobStore(ABC):
    """Where blobs live. Every method is blocking; async callers use `asyncio.to_thread`."""

    @abstractmethod
    def writer(self) -> BlobWriter:
        """Start a new blob."""

    @abstractmethod
    def _read(self, sha256: str) -> Iterator[bytes]:
        """The stored bytes, unverified; raises NotFound."""

    @abstractmethod
    def stat(self, sha256: str) -> BlobInfo:
        """Size of a stored blob; raises NotFound."""

    @abstractmethod
    def delete(self, sha256: str) -> None:
        """Remove a blob; removing a missing blob is not an error."""

    @abstractmethod
    def list(self) -> Iterator[BlobInfo]:
        """Every stored blob, in no particular order."""

    @abstractmethod
    def uri(self, sha256: str) -> str:
        """Where the blob lives, as `file://` or `s3://` URI."""

    @abstractmethod
    def sweep(self, older_than_seconds: float = 3600.0) -> int:
        """Remove leftovers of writes that never finished (a killed process); returns how many."""

    def exists(self, sha256: str) -> bool:
        try:
            self.stat(sha256)
        except NotFound:
            return False
        return True

    def put(self, chunks: Iterable[bytes], expected_sha256: str | None = None) -> BlobInfo:
        """Store the concatenation of `chunks`."""
        with self.writer() as writer:
            for chunk in chunks:
                writer.write(chunk)
            return writer.commit(expected_sha256)

    def put_file(self, path: Path) -> BlobInfo:
        with path.open("rb") as file:
            return self.put(iter(lambda: file.read(CHUNK_BYTES), b""))

    def open(self, sha256: str) -> Iterator[bytes]:
        """The blob's content in chunks, verified: if the stored bytes no longer hash to `sha256`,
        the iterator raises DataLoss after the last chunk (consumers must not trust the data
        until the iterator is exhausted)."""
        check_sha256(sha256)
        digest = hashlib.sha256()
        for chunk in self._read(sha256):
            digest.update(chunk)
            yield chunk
        if digest.hexdigest() != sha256:
            raise DataLoss(
                f"blob {sha256} is corrupt: its content hashes to {digest.hexdigest()}",
                reason="BLOB_CORRUPT",
                metadata={"sha256": sha256},
            )

    def read_bytes(self, sha256: str) -> bytes:
        """Whole content, verified; for small blobs only."""
        return b"".join(self.open(sha256))


# --- local directory ---------------------------------------------------------------------------


class LocalBlobStore(BlobStore):
    """Blobs as files under `root/sha256/<2 hex>/<sha256>`; writes go to `root/tmp/` first and
    are renamed into place, so a reader never sees a partial blob."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._tmp = root / "tmp"
        self._tmp.mkdir(parents=True, exist_ok=True)
        (root / "sha256").mkdir(exist_ok=True)

    def path(self, sha256: str) -> Path:
        check_sha256(sha256)
        return self.root / "sha256" / sha256[:2] / sha256

    def writer(self) -> BlobWriter:
        return _LocalWriter(self)

    def _read(self, sha256: str) -> Iterator[bytes]:
        try:
            file = self.path(sha256).open("rb")
        except FileNotFoundError:
            raise NotFound(f"blob {sha256} not found", metadata={"sha256": sha256}) from None
        with file:
            yield from iter(lambda: file.read(CHUNK_BYTES), b"")

    def stat(self, sha256: str) -> BlobInfo:
        try:
            return BlobInfo(sha256, self.path(sha256).stat().st_size)
        except FileNotFoundError:
            raise NotFound(f"blob {sha256} not found", metadata={"sha256": sha256}) from None

    def delete(self, sha256: str) -> None:
        self.path(sha256).unlink(missing_ok=True)

    def list(self) -> Iterator[BlobInfo]:
        for path in (self.root / "sha256").glob("??/*"):
            if _SHA256.match(path.name):
                yield BlobInfo(path.name, path.stat().st_size)

    def uri(self, sha256: str) -> str:
        return self.path(sha256).resolve().as_uri()

    def sweep(self, older_than_seconds: float = 3600.0) -> int:
        cutoff = time.time() - older_than_seconds
        removed = 0
        for part in self._tmp.glob("*.part"):
            try:
                if part.stat().st_mtime <= cutoff:
                    part.unlink()
                    removed += 1
            except FileNotFoundError:
                pass  # its writer finished or another sweep got it
        return removed


class _LocalWriter(BlobWriter):
    def __init__(self, store: LocalBlobStore) -> None:
        super().__init__()
        self._store = store
        self._temp = store._tmp / f"{uuid.uuid4().hex}.part"
        self._file: IO[bytes] = self._temp.open("xb")  # closed by commit or abort

    def _write(self, chunk: bytes) -> None:
        self._file.write(chunk)

    def _publish(self, info: BlobInfo) -> None:
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        final = self._store.path(info.sha256)
        final.parent.mkdir(exist_ok=True)
        self._temp.replace(final)  # atomic; same content if it already existed
        directory = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def _discard(self) -> None:
        self._file.close()
        self._temp.unlink(missing_ok=True)


# --- S3 ----------------------------------------------------------------------------------------


class S3BlobStore(BlobStore):
    """Blobs as objects `prefix/sha256/<2 hex>/<sha256>` in an S3-compatible bucket.

    A write spools to an anonymous local temporary file while hashing (the key is the hash, known
    only at the end), then uploads it; S3 makes an object visible only once its upload completes.
    A killed process leaves at most an incomplete multipart upload, which lists as no object and
    which `sweep` (or a bucket lifecycle rule) aborts.
    """

    def __init__(self, client: S3Client, bucket: str, prefix: str = "tunefleet") -> None:
        self.client = client
        self.bucket = bucket
        self.prefix = prefix.strip("/")

    @classmethod
    def from_settings(
        cls, bucket: str, prefix: str, endpoint_url: str | None, region: str | None
    ) -> S3BlobStore:
        import boto3

        client = boto3.client("s3", endpoint_url=endpoint_url, region_name=region)
        return cls(client, bucket, prefix)

    def key(self, sha256: str) -> str:
        check_sha256(sha256)
        return f"{self.prefix}/sha256/{sha256[:2]}/{sha256}"

    def writer(self) -> BlobWriter:
        return _S3Writer(self)

    def _read(self, sha256: str) -> Iterator[bytes]:
        try:
            body = self.client.get_object(Bucket=self.bucket, Key=self.key(sha256))["Body"]
        except self.client.exceptions.NoSuchKey:
            raise NotFound(f"blob {sha256} not found", metadata={"sha256": sha256}) from None
        with body:
            yield from body.iter_chunks(CHUNK_BYTES)

    def stat(self, sha256: str) -> BlobInfo:
        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self.key(sha256))
        except self.client.exceptions.ClientError as exc:
            if _s3_status(exc) == 404:
                raise NotFound(f"blob {sha256} not found", metadata={"sha256": sha256}) from None
            raise
        return BlobInfo(sha256, head["ContentLength"])

    def delete(self, sha256: str) -> None:
        self.client.delete_object(Bucket=self.bucket, Key=self.key(sha256))

    def list(self) -> Iterator[BlobInfo]:
        paginator = self.client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=f"{self.prefix}/sha256/"):
            for item in page.get("Contents", []):
                name = item["Key"].rpartition("/")[2]
                if _SHA256.match(name):
                    yield BlobInfo(name, item["Size"])

    def uri(self, sha256: str) -> str:
        return f"s3://{self.bucket}/{self.key(sha256)}"

    def sweep(self, older_than_seconds: float = 3600.0) -> int:
        cutoff = time.time() - older_than_seconds
        removed = 0
        paginator = self.client.get_paginator("list_multipart_uploads")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=f"{self.prefix}/"):
            for upload in page.get("Uploads", []):
                if upload["Initiated"].timestamp() <= cutoff:
                    self.client.abort_multipart_upload(
                        Bucket=self.bucket, Key=upload["Key"], UploadId=upload["UploadId"]
                    )
                    removed += 1
        return removed


class _S3Writer(BlobWriter):
    def __init__(self, store: S3BlobStore) -> None:
        super().__init__()
        self._store = store
        # Unlinked at once: nothing survives a kill. Closed by commit or abort.
        self._spool = tempfile.TemporaryFile()  # noqa: SIM115

    def _write(self, chunk: bytes) -> None:
        self._spool.write(chunk)

    def _publish(self, info: BlobInfo) -> None:
        try:
            if self._store.exists(info.sha256):
                return
            self._spool.seek(0)
            self._store.client.upload_fileobj(
                self._spool, self._store.bucket, self._store.key(info.sha256)
            )
        finally:
            self._spool.close()

    def _discard(self) -> None:
        self._spool.close()


def _s3_status(exc: Any) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
