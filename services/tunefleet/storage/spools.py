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
import time
from pathlib import Path
from typing import IO

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
