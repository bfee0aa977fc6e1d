"""A version being uploaded: its files stream into a staging directory, each checked against
the size and sha256 its message declared and against the server's limits, until the upload is
registered (`AdapterManager.finish_upload`) or discarded."""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tunefleet.adapters import validation
from tunefleet.core.errors import InvalidArgument, ResourceExhausted


@dataclass
class VersionUpload:
    """A version being uploaded: files land in a staging directory, within the limits given."""

    adapter: str
    description: str
    lineage: dict[str, Any]
    staging: Path
    max_file_bytes: int
    max_version_bytes: int
    request_id: str = ""
    request_sha256: str = ""
    files: dict[str, int] = field(default_factory=dict)
    total: int = 0
    _current: str | None = None
    _handle: IO[bytes] | None = None
    _owner: IO[str] | None = None  # the spool's lock (storage.spools)
    _expected: dict[str, tuple[int, str]] = field(default_factory=dict)
    _hashes: dict[str, Any] = field(default_factory=dict)

    def start_file(self, path: str, size_bytes: int, sha256: str) -> None:
        self.end_file()
        validation.check_path(path)
        if path in self.files:
            raise validation.refuse(path, "DUPLICATE_FILE", "the file was sent twice")
        if size_bytes > self.max_file_bytes:
            raise self.too_large(path, size_bytes)
        target = self.staging / path
        target.parent.mkdir(parents=True, exist_ok=True)
        self._current, self._handle = path, target.open("wb")
        self._hashes[path] = hashlib.sha256()
        self.files[path] = 0
        if size_bytes or sha256:
            self._expected[path] = (size_bytes, sha256)

    def write(self, chunk: bytes) -> None:
        if self._handle is None or self._current is None:
            raise InvalidArgument("file", "a chunk must follow a file message")
        path = self._current
        self.files[path] += len(chunk)
        self.total += len(chunk)
        if self.files[path] > self.max_file_bytes:
            raise self.too_large(path, self.files[path])
        if self.total > self.max_version_bytes:
            raise ResourceExhausted(
                f"the version exceeds {self.max_version_bytes} bytes",
                reason="VERSION_TOO_LARGE",
            )
        self._hashes[path].update(chunk)
        self._handle.write(chunk)

    def end_file(self) -> None:
        if self._handle is None or self._current is None:
            return
        self._handle.close()
        path = self._current
        self._handle = self._current = None
        size, sha256 = self._expected.get(path, (0, ""))
        actual = self._hashes[path].hexdigest()
        if size and size != self.files[path]:
            raise validation.refuse(
                path, "SIZE_MISMATCH", f"declared {size} bytes, received {self.files[path]}"
            )
        if sha256 and sha256 != actual:
            raise validation.refuse(
                path, "CHECKSUM_MISMATCH", f"declared sha256 {sha256}, received {actual}"
            )

    def discard(self) -> None:
        if self._handle is not None:
            self._handle.close()
        shutil.rmtree(self.staging, ignore_errors=True)
        if self._owner is not None:
            self._owner.close()

    def too_large(self, path: str, size: int) -> ResourceExhausted:
        return ResourceExhausted(
            f"files[{path!r}]: {size} bytes is over the limit of {self.max_file_bytes}",
            reason="FILE_TOO_LARGE",
            metadata={"file": path},
        )
