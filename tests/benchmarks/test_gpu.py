"""The GPU check's dry run (`make gpu-check DRY_RUN=1`): the script a GPU session runs keeps
working, on CPU with a tiny model, through the same code paths."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

GPU = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu.py"


def test_the_gpu_check_runs_dry_on_cpu() -> None:
    result = subprocess.run(
        [sys.executable, str(GPU), "--dry-run"], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stderr[-4000:]
    lines = {m.group(1): m.group(0) for m in re.finditer(r"^  (\w+) *: .*$", result.stdout, re.M)}
    assert set(lines) == {"qlora", "lora", "full"}, result.stdout
    for line in lines.values():
        assert "failed" not in line and "ms a step" in line and "GiB" in line, line
    # QLoRA and LoRA train adapters only: fewer trainable parameters than full fine-tuning.
    trainable = {
        name: int(re.sub(r"\D", "", line.split(" trainable")[0].rsplit(" ", 1)[1]))
        for name, line in lines.items()
    }
    assert trainable["lora"] < trainable["full"] and trainable["qlora"] < trainable["full"]
    # tunefleet's LoRA and TRL's SFTTrainer (both regimes) each train, and are compared.
    rounds = re.findall(r"^  round 1 (.+?) *: +([\d,]+) tokens/s", result.stdout, re.M)
    assert [side for side, _ in rounds] == ["tunefleet", "TRL, defaults", "TRL, no checkpointing"]
    assert all(int(speed.replace(",", "")) > 0 for _, speed in rounds)
    assert result.stdout.count("tokens/s, tunefleet / TRL") == 2, result.stdout
