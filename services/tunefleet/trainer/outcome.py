"""The trainer's outcome, for its launcher: a small JSON document at $TUNEFLEET_RESULT_FILE
(the local launcher's run directory; /dev/termination-log in a Kubernetes Pod, which the kubelet
keeps as the container's termination message). It says what the trainer left behind even when
its reports could not reach TrainingService: the registered `adapter_version`, the stored
registration request (`output_request`) TrainingService can send itself, or why it failed
(`reason`, `message`)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

LIMIT = 3500  # Kubernetes keeps 4096 bytes of a termination message
_fields: dict[str, Any] = {}

# The exit status of a process of a multi-process run whose peer went away (PEER_LOST): unlike
# the trainer's other failures, not final (tunefleet.training.launcher).
PEER_LOST_EXIT = 6


def reset() -> None:
    _fields.clear()


def record(**fields: Any) -> None:
    """Add `fields` to the outcome and write it where the launcher reads it (if anywhere)."""
    _fields.update(fields)
    path = os.environ.get("TUNEFLEET_RESULT_FILE")
    if not path:
        return
    document = dict(_fields)
    text = json.dumps(document)
    if len(text) > LIMIT and "message" in document:
        message = str(document["message"])
        document["message"] = message[: max(0, len(message) - (len(text) - LIMIT) - 50)]
        text = json.dumps(document)
    Path(path).write_text(text)


def read(text: str) -> dict[str, Any]:
    """An outcome written by `record` (empty when `text` is not one)."""
    try:
        document = json.loads(text)
    except ValueError:
        return {}
    return document if isinstance(document, dict) else {}
