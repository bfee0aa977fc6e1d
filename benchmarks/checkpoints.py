"""Checkpoint retention benchmark: the scratch disk a run's checkpoints take, and the run's time,
keeping the newest 3 and the best (tunefleet's default) against keeping every checkpoint (what
the trainer did before), in the same run: after a warm-up of each, rounds interleaved in a
rotating order (benchmarks/harness.py), each round printed, each ratio as its median and range.

    python benchmarks/checkpoints.py [--steps 24] [--rounds 3] [--method full]

Both sides run the same job (a small random Llama, full fine-tuning by default so that each
checkpoint carries the whole model and its optimizer state, as an 8B full fine-tune's ~100 GB
do) with a checkpoint every step, stored in a local blob store as a cluster trainer's are.
Measured per round: the largest size of the local checkpoint directory while the run goes (sampled
every 50 ms), its size at the end, and the wall time. The blob store's copies of pruned
checkpoints are deleted by TrainingService (tests/training/test_service.py), not measured here.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import rotations, spread, warm_up  # noqa: E402
from benchmarks.train import SMALL, build_data, build_model  # noqa: E402

KEEP_ALL = 1_000_000


def size(directory: Path) -> int:
    total = 0
    for root, _, files in os.walk(directory):
        for name in files:
            with contextlib.suppress(OSError):  # pruned while walking
                total += (Path(root) / name).stat().st_size
    return total


def run(
    model: Path, data: Path, steps: int, method: str, keep: int, workdir: Path
) -> dict[str, Any]:
    output = workdir / f"keep-{keep}"
    spec = {
        "base_model": str(model),
        "method": method,
        "lora": {"rank": 16, "dropout": 0.0, "target_modules": "all-linear"},
        "hyperparameters": {
            "learning_rate": 2e-5 if method == "full" else 2e-4,
            "epochs": 100,
            "max_steps": steps,
            "micro_batch_size": 4,
            "max_sequence_length": 128,
            "checkpoint_every_steps": 1,
            "precision": "fp32",
            "seed": 1,
        },
        "train_data": {"uri": str(data)},
        "output_dir": str(output),
        "storage": {"blob_backend": "local", "blob_dir": str(workdir / f"blobs-{keep}")},
        "keep_checkpoints": keep,
    }
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / f"spec-{keep}.json"
    path.write_text(json.dumps(spec))
    peak, done = 0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.wait(0.05):
            peak = max(peak, size(output / "checkpoints"))

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "tunefleet.trainer", "--spec", str(path)],
        check=True,
        capture_output=True,
    )
    seconds = time.perf_counter() - started
    done.set()
    sampler.join()
    final = size(output / "checkpoints")
    return {"peak": max(peak, final), "final": final, "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--method", default="full", choices=["full", "lora"])
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as temporary:
        workdir = Path(temporary)
        model = build_model(workdir / "model", SMALL)
        data = build_data(workdir / "data.jsonl", 400)
        mib = 1024 * 1024
        sides = {"keep 3 + best": 3, "keep all": KEEP_ALL}
        print(f"{args.method}, {args.steps} steps, a checkpoint every step")
        print(f"{'round':>7} {'side':<14} {'peak MiB':>9} {'end MiB':>8} {'seconds':>8}")

        def measure(label: str, number: int | str, steps: int) -> dict[str, Any]:
            measured = run(model, data, steps, args.method, sides[label], workdir / f"r{number}")
            print(
                f"{number:>7} {label:<14} {measured['peak'] / mib:>9.1f} "
                f"{measured['final'] / mib:>8.1f} {measured['seconds']:>8.1f}"
            )
            return measured

        warm_up(list(sides), lambda label: measure(label, "warm-up", 4))
        disk, time_ratio = [], []
        for number, order in rotations(list(sides), args.rounds):
            results = {label: measure(label, number, args.steps) for label in order}
            kept, every = results["keep 3 + best"], results["keep all"]
            disk.append(every["peak"] / kept["peak"])
            time_ratio.append(kept["seconds"] / every["seconds"])
        print(f"checkpoint disk, keep all / keep 3 + best: {spread(disk)}")
        print(f"run time, keep 3 + best / keep all: {spread(time_ratio)}")


if __name__ == "__main__":
    main()
