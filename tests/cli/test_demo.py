"""`make demo-quick` (the demo on a tiny model) runs end to end; `make demo` is the same tour on
SmolLM2-135M-Instruct."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.timeout(1200)  # a generous bound for a busy machine, not a claim


def test_quick_demo_runs_end_to_end(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "tunefleet.demo", "--quick", "--data-dir", str(tmp_path / "data")],
        capture_output=True,
        text=True,
        timeout=1100,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    check_tour(result.stdout)
    assert "tunefleet serve exited with 0" in result.stdout
    # The embedded server's OpenAI-compatible API answered from the version prod serves.
    assert "through the OpenAI-compatible API" in result.stdout
    assert "  [adapters/orders/versions/2; response id " in result.stdout


def check_tour(out: str) -> None:
    """What the tour printed shows every step done."""
    # Ingestion reports the sample's flaws: a truncated line, a record without an answer, a
    # duplicate and an e-mail address.
    assert "read 243, rejected 2:" in out
    assert "line 61: INVALID_JSON" in out
    assert "line 102: NO_ASSISTANT_TURN" in out
    assert "duplicates removed: 1 exact" in out
    assert "PII redacted: 1 x EMAIL" in out
    # Two versions trained live, each with its loss falling, registered under adapters/orders.
    losses = re.findall(r"validation loss ([\d.]+) \(base\) -> ([\d.]+); registered (\S+)", out)
    assert [version for _, _, version in losses] == [
        "adapters/orders/versions/1",
        "adapters/orders/versions/2",
    ]
    assert all(float(after) < float(before) for before, after, _ in losses)
    assert out.count("[SUCCEEDED]") == 2
    # EvaluationService judged base, few-shot prompting and both versions on the same held-out
    # records, twice printed (after training and in the summary): counts with 95% intervals, the
    # paired difference from the base model with McNemar's p-value, JSON validity, the gate.
    rows = re.findall(
        r"^  (base|few-shot|v1|v2) +(\d+)/12 +\d+% \[\d+%, \d+%\] +(\S.*)$", out, re.MULTILINE
    )
    assert [name for name, _, _ in rows] == ["base", "few-shot", "v1", "v2"] * 2, out
    assert rows[0][2].startswith("(baseline)")
    for _, _, rest in rows[1:4]:
        assert re.match(r"[+-]\d+% \[[+-]\d+%, [+-]\d+%\] +[\d.e-]+ +\d+% +(passed|failed)$", rest)
    # prod moved from version 1 to version 2 and the server followed it without a restart.
    assert (
        "adapters/orders@prod served adapters/orders/versions/1, now adapters/orders/versions/2"
        in out
    )
    assert "rating +1 for adapters/orders/versions/2" in out
    # A turn of the improvement loop: prod's answers corrected, a challenger (version 3) trained
    # on them and judged against prod on the frozen set; prod moves only if the gate passed.
    assert re.search(r"prod answered 12 prompts; \d+ corrected", out), out
    gate = re.findall(r"^  (champion|challenger) +\d+/12 .*$", out, re.MULTILINE)
    assert gate == ["champion", "challenger"], out
    loop = re.search(r"adapters/orders@prod serves (\S+): (promoted|gate_failed)", out)
    assert loop is not None, out
    promoted = loop[2] == "promoted"
    assert loop[1] == f"adapters/orders/versions/{3 if promoted else 2}"
    assert 'tunefleet_inference_requests_total{adapter="adapters/orders"' in out
    assert re.search(r"demo finished in \d+ s", out)
