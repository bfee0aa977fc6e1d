"""The `deb-src` line that build-apiserver.sh fetches Kubernetes' Debian source package with, made
from the mirror this machine's apt already uses (a corporate or regional mirror, or CI's own):
the first enabled `deb` entry for the suite's `main` component, in /etc/apt/sources.list and the
one-line (`*.list`) and deb822 (`*.sources`) files of /etc/apt/sources.list.d/, in apt's order.

    python3 tests/kube/apt_source.py [SUITE]    # prints `deb-src URI SUITE main`, or exits 1

It runs with the system's Python, before any virtual environment exists: standard library only.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

SUITE = "bookworm"


@dataclass(frozen=True)
class Entry:
    types: tuple[str, ...]
    uris: tuple[str, ...]
    suites: tuple[str, ...]
    components: tuple[str, ...]


def one_line_entries(text: str) -> Iterator[Entry]:
    """`deb [options] URI SUITE COMPONENT...` lines (sources.list(5), one-line style)."""
    for raw in text.splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        kind, _, rest = line.partition(" ")
        rest = rest.strip()
        if rest.startswith("["):  # options, such as [arch=amd64 signed-by=...]
            rest = rest.partition("]")[2].strip()
        words = rest.split()
        if len(words) >= 2:
            yield Entry((kind,), (words[0],), (words[1],), tuple(words[2:]))


def deb822_entries(text: str) -> Iterator[Entry]:
    """Stanzas of `Field: value` lines separated by blank lines (sources.list(5), deb822 style),
    skipping those with `Enabled: no`."""
    for stanza in _stanzas(text):
        if stanza.get("enabled", "yes").lower() == "no":
            continue
        yield Entry(
            tuple(stanza.get("types", "").split()),
            tuple(stanza.get("uris", "").split()),
            tuple(stanza.get("suites", "").split()),
            tuple(stanza.get("components", "").split()),
        )


def _stanzas(text: str) -> Iterator[dict[str, str]]:
    fields: dict[str, str] = {}
    last = ""
    for raw in [*text.splitlines(), ""]:
        if raw.startswith("#"):
            continue
        if not raw.strip():
            if fields:
                yield fields
            fields, last = {}, ""
        elif raw[0] in " \t" and last:  # a continuation line
            fields[last] += " " + raw.strip()
        elif ":" in raw:
            key, _, value = raw.partition(":")
            last = key.strip().lower()
            fields[last] = value.strip()


def machine_entries(root: Path = Path("/etc/apt")) -> Iterator[Entry]:
    """The machine's sources, in apt's order: sources.list, then sources.list.d/ by name."""
    main = root / "sources.list"
    if main.is_file():
        yield from one_line_entries(main.read_text())
    parts = root / "sources.list.d"
    for path in sorted(parts.iterdir()) if parts.is_dir() else []:
        if path.suffix == ".list":
            yield from one_line_entries(path.read_text())
        elif path.suffix == ".sources":
            yield from deb822_entries(path.read_text())


def deb_src_line(entries: Iterator[Entry], suite: str = SUITE) -> str | None:
    for entry in entries:
        wanted = "deb" in entry.types and suite in entry.suites and "main" in entry.components
        if wanted and entry.uris:
            return f"deb-src {entry.uris[0].rstrip('/')} {suite} main"
    return None


def main() -> int:
    suite = sys.argv[1] if len(sys.argv) > 1 else SUITE
    line = deb_src_line(machine_entries(), suite)
    if line is None:
        print(
            f"no apt source for Debian {suite} main in /etc/apt/sources.list or "
            "/etc/apt/sources.list.d/ (*.list, *.sources): configure this machine's mirror first",
            file=sys.stderr,
        )
        return 1
    print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
