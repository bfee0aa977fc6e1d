"""Checkpoints: trainable weights, optimizer, scheduler, RNG states and the position in the data,
written to a temporary directory and renamed into place, so a kill never leaves half of one."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np


def trainable_state(model: Any) -> dict[str, Any]:
    return {
        name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad
    }


def save(
    directory: Path, step: int, model: Any, optimizer: Any, scheduler: Any, state: dict[str, Any]
) -> Path:
    import torch
    from safetensors.torch import save_file

    final = path(directory, step)
    partial = directory / f".checkpoint-{step:08d}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    save_file(trainable_state(model), str(partial / "trainable.safetensors"))
    torch.save(
        {
            "optimizer": optimizer.state_dict(),
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


def load_weights(checkpoint: Path, model: Any) -> None:
    """Copy a checkpoint's trainable weights into `model`."""
    import torch
    from safetensors.torch import load_file

    weights = load_file(str(checkpoint / "trainable.safetensors"))
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in weights.items():
            parameters[name].copy_(value)


def load(path: Path, model: Any, optimizer: Any, scheduler: Any) -> dict[str, Any]:
    """Restore a checkpoint into the model, optimizer and scheduler; returns the loop state."""
    import torch

    load_weights(path, model)
    # The checkpoint is this trainer's own output, so loading its pickled optimizer state is safe.
    saved = torch.load(path / "training_state.pt", weights_only=False)
    optimizer.load_state_dict(saved["optimizer"])
    scheduler.load_state_dict(saved["scheduler"])
    random.setstate(saved["rng"]["python"])
    np.random.set_state(saved["rng"]["numpy"])
    torch.set_rng_state(saved["rng"]["torch"])
    state: dict[str, Any] = json.loads((path / "state.json").read_text())
    return state
