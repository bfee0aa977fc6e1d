"""Big files as users bring them, through the real CLI to DatasetService's own process (the
shape deploy/ runs): the server's memory stays bounded, and the progress bar moves."""

from __future__ import annotations

import json
import os
import pty
import random
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.datasets.records import WORDS
from tunefleet.demo.server import LocalServer

pytestmark = [pytest.mark.large, pytest.mark.timeout(1800)]
TUNEFLEET = Path(sys.executable).with_name("tunefleet")
MiB = 1 << 20


def write_records(path: Path, size: int, seed: int = 0) -> int:
    """Distinct Alpaca records of about 1 KB, `size` bytes in all; returns how many. Each is
    sentences drawn from 4,096, so no two are near duplicates."""
    rng = random.Random(seed)
    sentences = [" ".join(rng.choices(WORDS, k=20)) + "." for _ in range(4096)]
    count = written = 0
    with path.open("w") as file:
        while written < size:
            picked = rng.choices(sentences, k=7)
            record = {
                "instruction": " ".join(picked[:2]),
                "input": "",
                "output": " ".join(picked[2:]),
            }
            line = json.dumps(record) + "\n"
            file.write(line)
            written += len(line)
            count += 1
    return count


def memory(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {key} for {pid}")


def reset_peak(pid: int) -> int:
    """Reset the process's peak RSS (VmHWM) to its current RSS; returns that RSS."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")
    return memory(pid, "VmRSS")


def upload_in_a_terminal(server: LocalServer, path: Path, *options: str) -> str:
    """`tunefleet datasets upload` with its output on a pseudo-terminal, as a user sees it."""
    controller, terminal = pty.openpty()
    env = {**os.environ, "TUNEFLEET_TARGET": server.target, "COLUMNS": "120", "TERM": "xterm"}
    process = subprocess.Popen(
        [str(TUNEFLEET), "datasets", "upload", str(path), *options],
        stdin=subprocess.DEVNULL,
        stdout=terminal,
        stderr=terminal,
        env=env,
    )
    os.close(terminal)
    seen = bytearray()

    def read() -> None:
        while True:
            try:
                data = os.read(controller, 65536)
            except OSError:  # the terminal closed
                return
            if not data:
                return
            seen.extend(data)

    reader = threading.Thread(target=read)
    reader.start()
    code = process.wait(timeout=1500)
    reader.join(timeout=60)
    os.close(controller)
    text = seen.decode("utf-8", "replace")
    assert code == 0, text[-2000:]
    return text


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalServer]:
    with LocalServer(
        tmp_path_factory.mktemp("datasets"),
        {"logging": {"level": "WARNING"}},
        services=["datasets"],
    ) as started:
        yield started


def test_a_10_mb_record_adds_under_300_mb(server: LocalServer, tmp_path: Path) -> None:
    rng = random.Random(1)
    text = " ".join(rng.choices(WORDS, k=1_500_000))[: 10 * MiB]
    path = tmp_path / "one-big-record.jsonl"
    path.write_text(
        json.dumps({"prompt": "Summarise this.", "completion": text}) + "\n"
        + json.dumps({"prompt": "Hello?", "completion": "Hi."}) + "\n"
    )  # fmt: skip
    assert server.process is not None
    before = reset_peak(server.process.pid)
    shown = upload_in_a_terminal(server, path, "--max-record-chars", str(11 * MiB))
    assert "2 (" in shown  # both records kept
    growth = memory(server.process.pid, "VmHWM") - before
    print(f"10 MB record: server peak RSS grew by {growth / MiB:.0f} MiB")
    assert growth < 300 * MiB


def test_a_1_gb_file_uploads_with_defaults_in_bounded_memory(
    server: LocalServer, tmp_path: Path
) -> None:
    path = tmp_path / "big.jsonl"
    count = write_records(path, 1 << 30)
    assert server.process is not None
    reset_peak(server.process.pid)
    shown = upload_in_a_terminal(server, path)
    peak = memory(server.process.pid, "VmHWM")
    print(f"1 GiB, {count} records: server peak RSS {peak / MiB:.0f} MiB")
    assert peak < 1536 * MiB
    assert re.search(rf"records\s+{count} \(", re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown))
    # The progress bar was drawn again and again, its byte count rising.
    progress = [float(x) for x in re.findall(r"([0-9.]+)/1\.1 GB", shown)]
    assert len(set(progress)) >= 5 and progress == sorted(progress), progress[:20]
