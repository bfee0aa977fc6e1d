"""build-apiserver.sh fetches Kubernetes' Debian source from the mirror the machine's own apt
sources name, in either format sources.list(5) allows; no mirror is written in the repository."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.kube import apt_source

ROOT = Path(__file__).resolve().parents[2]
MIRROR = "http://mirror.example.internal/debian"

ONE_LINE = f"""\
# deb http://commented.example/debian bookworm main
deb [arch=amd64 signed-by=/usr/share/keyrings/debian.gpg] {MIRROR}/ bookworm-updates main
deb-src {MIRROR} bullseye main
deb [trusted=yes] {MIRROR}/ bookworm main contrib   # the archive itself
deb http://other.example/debian bookworm main
"""

DEB822 = f"""\
Types: deb
URIs: http://disabled.example/debian
Suites: bookworm
Components: main
Enabled: no

# The security archive: another suite.
Types: deb
URIs: {MIRROR}-security
Suites: bookworm-security
Components: main

Types: deb deb-src
# http://snapshot.debian.org/archive/debian/20250520T000000Z
URIs: {MIRROR}
  http://second.example/debian
Suites: bookworm
  bookworm-updates
Components: main non-free-firmware
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
"""


def test_the_one_line_format_gives_the_archive_s_mirror() -> None:
    line = apt_source.deb_src_line(apt_source.one_line_entries(ONE_LINE))
    assert line == f"deb-src {MIRROR} bookworm main"


def test_the_deb822_format_gives_the_archive_s_mirror() -> None:
    line = apt_source.deb_src_line(apt_source.deb822_entries(DEB822))
    assert line == f"deb-src {MIRROR} bookworm main"


def test_sources_list_comes_before_the_parts_which_come_in_name_order(tmp_path: Path) -> None:
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list.d" / "b.sources").write_text(DEB822)
    (tmp_path / "sources.list.d" / "a.list").write_text(
        "deb http://first.example/d bookworm main\n"
    )
    (tmp_path / "sources.list.d" / "c.list.disabled").write_text(
        "deb http://x.example bookworm main\n"
    )
    found = apt_source.deb_src_line(apt_source.machine_entries(tmp_path))
    assert found == "deb-src http://first.example/d bookworm main"
    (tmp_path / "sources.list").write_text(ONE_LINE)
    found = apt_source.deb_src_line(apt_source.machine_entries(tmp_path))
    assert found == f"deb-src {MIRROR} bookworm main"


def test_no_source_for_the_suite_fails_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    (tmp_path / "sources.list").write_text("deb http://x.example/debian bullseye main\n")
    entries = apt_source.machine_entries
    monkeypatch.setattr(apt_source, "machine_entries", lambda: entries(tmp_path))
    monkeypatch.setattr(sys, "argv", ["apt_source.py", "bookworm"])
    assert apt_source.main() == 1
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1
    assert "no apt source for Debian bookworm main" in captured.err


def test_this_machine_s_own_sources_give_a_line() -> None:
    """What the build script runs, with the system's Python."""
    result = subprocess.run(
        ["python3", str(ROOT / "tests/kube/apt_source.py"), "bookworm"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("deb-src ") and result.stdout.endswith(" bookworm main\n")


def test_no_mirror_host_is_written_in_the_repository() -> None:
    tracked = subprocess.run(
        ["git", "grep", "-l", "-I", "-E", r"deb\.debian\.org|ftp\.[a-z.]*debian\.org", "--", "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if tracked.returncode not in (0, 1):  # not a git checkout (a copy): nothing to check
        pytest.skip(tracked.stderr.strip())
    found = [path for path in tracked.stdout.split() if path != "tests/kube/test_apt_source.py"]
    assert found == []
