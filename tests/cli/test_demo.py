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
    # The sample's flaws are reported: a truncated line, a record without an answer, a duplicate
    # and an e-mail address.
    assert "read 243, rejected 2:" in result.stdout
    assert "line 61: INVALID_JSON" in result.stdout
    assert "line 102: NO_ASSISTANT_TURN" in result.stdout
    assert "duplicates removed: 1 exact" in result.stdout
    assert "PII redacted: 1 x EMAIL" in result.stdout
    assert "0 training jobs" in result.stdout
    assert "FAILED_PRECONDITION: this server serves no model" in result.stdout
    assert "tunefleet_dataset_records_accepted_total 241.0" in result.stdout
    assert "tunefleet serve exited with 0" in result.stdout
