"""`make demo` runs end to end."""

from __future__ import annotations

import subprocess
import sys


def test_demo_runs_end_to_end() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tunefleet.cli.demo"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for service in ("DatasetService", "TrainingService", "AdapterService", "InferenceService"):
        assert f"tunefleet.v1.{service}" in result.stdout
    assert result.stdout.count("SERVING") == 4
    assert "UNIMPLEMENTED: tunefleet.v1.DatasetService.GetDataset is not implemented yet" in (
        result.stdout
    )
    assert 'grpc_code="UNIMPLEMENTED",grpc_method="GetDataset"' in result.stdout
    assert "tunefleet serve exited with 0" in result.stdout
