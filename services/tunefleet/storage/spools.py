"""Working directories of uploads in progress (`work/*/upload-*`), and sweeping those whose
process died: a killed upload leaves its spool behind, and nothing else would ever remove it.

The process that owns a spool holds an exclusive `flock` on its `.owner` file for as long as it
lives; the kernel releases it when the process dies, however it dies. A sweep removes every
spool whose lock it can take, so it is safe while other processes (sharing the data folder)
upload: their spools stay locked.
"""

from __future__ import annotations

import fcntl
import logging
import shutil
import threading
import time
from pathlib import Path
from typing import IO

from tunefleet.core.errors import ResourceExhausted

log = logging.getLogger(__name__)

OWNER = ".owner"
PATTERN = "upload-*"
# A spool younger than this without its lock file is being created, not abandoned.
CREATING_SECONDS = 60.0


def hold(spool: Path) -> IO[str]:
    """Mark `spool` (an existing directory) as in use by this process until the returned file
    is closed (or the process ends)."""
    owner = (spool / OWNER).open("w")
    fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return owner


def sweep(parent: Path) -> int:
    """Remove the spools under `parent` that no live process holds; how many."""
    removed = 0
    for spool in parent.glob(PATTERN):
        try:
            with (spool / OWNER).open() as owner:
                fcntl.flock(owner, fcntl.LOCK_EX | fcntl.LOCK_NB)
                shutil.rmtree(spool, ignore_errors=True)
        except BlockingIOError:
            continue  # in use
        except FileNotFoundError:  # no lock file: being created, or from before locks
            try:
                if time.time() - spool.stat().st_mtime < CREATING_SECONDS:
                    continue
            except FileNotFoundError:
                continue
            shutil.rmtree(spool, ignore_errors=True)
        removed += 1
    if removed:
        log.info("removed %d abandoned upload spool(s) under %s", removed, parent)
    return removed


class SpaceBudget:
    """Working space of the uploads in progress on one volume.

    While an upload streams in, its working files (spool, duplicate signatures) grow; when it
    finishes, it writes its final records file and the blob store's copy, about `factor` times
    what it had written (`benchmarks/upload_space.py` measures it). After every chunk an upload
    claims that future space; one that would leave less than `min_free_bytes` free, counting what
    the other uploads in progress will still write, is refused with RESOURCE_EXHAUSTED before the
    disk fills, instead of failing on ENOSPC at the end. `factor` 0 turns the accounting off.
    """

    def __init__(self, folder: Path, factor: float, min_free_bytes: int) -> None:
        self.folder, self.factor, self.min_free_bytes = folder, factor, min_free_bytes
        self._pending: dict[object, int] = {}  # upload -> bytes it will still write
        self._lock = threading.Lock()

    def claim(self, upload: object, written: int) -> None:
        """Account for an upload whose working files now hold `written` bytes; refuse it if the
        volume cannot take what it and the other uploads will still write."""
        if self.factor <= 0:
            return
        pending = int(self.factor * written)
        with self._lock:
            others = sum(v for k, v in self._pending.items() if k is not upload)
            free = shutil.disk_usage(self.folder).free
            if free - others - pending < self.min_free_bytes:
                self._pending.pop(upload, None)
                raise ResourceExhausted(
                    f"not enough disk space to finish this upload: its working files hold "
                    f"{written} bytes and finishing writes about {pending} more, uploads in "
                    f"progress {others} more, {self.min_free_bytes} must stay free, and "
                    f"{free} are free",
                    reason="INSUFFICIENT_SPACE",
                    metadata={"free_bytes": str(free), "needed_bytes": str(pending + others)},
                )
            self._pending[upload] = pending

    def release(self, upload: object) -> None:
        with self._lock:
            self._pending.pop(upload, None)
