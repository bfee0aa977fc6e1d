"""Checkpoints: trainable weights, optimizer, scheduler, RNG states and the position in the data,
written to a temporary directory and renamed into place, so a kill never leaves half of one."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np


def save(
    directory: Path,
    step: int,
    weights: dict[str, Any],
    optimizer_state: dict[str, Any],
    scheduler: Any,
    state: dict[str, Any],
) -> Path:
    """Write a checkpoint of the trainable `weights` and the optimizer's state (see
    tunefleet.trainer.sharding for how they are gathered)."""
    import torch
    from safetensors.torch import save_file

    final = path(directory, step)
    partial = directory / f".checkpoint-{step:08d}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file(weights, str(partial / "trainable.safetensors"))
    torch.save(
        {
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "rng": {
                "python": random.getstate(),
                "numpy": np.random.get_state(),
                "torch": torch.get_rng_state(),
            },
        },
        partial / "training_state.pt",
    )
    (partial / "state.json").write_text(json.dumps(state))
    shutil.rmtree(final, ignore_errors=True)
    partial.rename(final)
    return final


def path(directory: Path, step: int) -> Path:
    return directory / f"checkpoint-{step:08d}"


def prune(directory: Path, keep: int, best_step: int | None) -> list[Path]:
    """Delete all but the newest `keep` checkpoints and the one of `best_step`; those deleted."""
    found = sorted(directory.glob("checkpoint-*"))
    kept = set(found[-keep:]) | ({path(directory, best_step)} if best_step is not None else set())
    removed = [p for p in found if p not in kept]
    for old in removed:
        shutil.rmtree(old, ignore_errors=True)
    return removed


def latest(directory: Path) -> Path | None:
    found = sorted(directory.glob("checkpoint-*")) if directory.is_dir() else []
    return found[-1] if found else None


def read_weights(checkpoint: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return load_file(str(checkpoint / "trainable.safetensors"))


def read(checkpoint: Path) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """A checkpoint's trainable weights, its training state (optimizer, scheduler, RNG) and
    the loop's state."""
    import torch

    # The checkpoint is this trainer's own output, so loading its pickled optimizer state is safe.
    saved = torch.load(checkpoint / "training_state.pt", weights_only=False)
    state: dict[str, Any] = json.loads((checkpoint / "state.json").read_text())
    return read_weights(checkpoint), saved, state


def restore_training_state(saved: dict[str, Any], scheduler: Any) -> None:
    """Put back the scheduler and the random number generators (the optimizer is restored with
    the weights)."""
    import torch

    scheduler.load_state_dict(saved["scheduler"])
    random.setstate(saved["rng"]["python"])
    np.random.set_state(saved["rng"]["numpy"])
    torch.set_rng_state(saved["rng"]["torch"])
