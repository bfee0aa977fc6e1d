"""`tunefleet eval annotate` in a real terminal: tmux runs it, the test reads the screen
(capture-pane) and presses keys (send-keys) as a person would, then reads the tally back through
the SDK. The two candidates are a stub OpenAI endpoint's models, one always right."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.client.conftest import chat_model, platform
from tests.evaluation.openai_stub import Stub, openai_stub
from tests.evaluation.test_service import repeat_records
from tests.helpers import IN_CI
from tunefleet.client import Client
from tunefleet.demo.server import LocalServer

__all__ = ["chat_model", "platform"]
pytestmark = pytest.mark.timeout(300)
TUNEFLEET = Path(sys.executable).with_name("tunefleet")
MUTE = "I cannot help with that."


@pytest.fixture
def stub() -> Iterator[Stub]:
    with openai_stub() as running:
        yield running


class Terminal:
    """A tmux session of its own server (socket), killed at the end with what runs in it."""

    def __init__(self, socket: str, command: list[str], environment: dict[str, str]) -> None:
        self.tmux = ["tmux", "-L", socket]
        variables = [f"-e{key}={value}" for key, value in environment.items()]
        shell = " ".join(command) + "; echo EXITED $?; sleep 600"
        subprocess.run(
            [*self.tmux, "new-session", "-d", "-x", "150", "-y", "60", *variables, shell],
            check=True,
        )

    def screen(self) -> str:
        done = subprocess.run(
            [*self.tmux, "capture-pane", "-p"], capture_output=True, text=True, check=True
        )
        return done.stdout

    def wait_for(self, pattern: str, within: float = 60) -> str:
        deadline = time.monotonic() + within
        while True:
            screen = self.screen()
            if re.search(pattern, screen):
                return screen
            assert time.monotonic() < deadline, f"no {pattern!r} on the screen:\n{screen}"
            time.sleep(0.1)

    def press(self, key: str) -> None:
        subprocess.run([*self.tmux, "send-keys", key], check=True)

    def close(self) -> None:
        subprocess.run([*self.tmux, "kill-server"], check=False, capture_output=True)


def tmux_available() -> None:
    if shutil.which("tmux") is None:
        if IN_CI:
            pytest.fail("tmux is not installed (make system-deps installs it)")
        pytest.skip("tmux is not installed")


def test_a_person_judges_every_item_in_the_terminal(platform: LocalServer, stub: Stub) -> None:
    tmux_available()
    with Client(platform.target) as client:
        dataset = client.datasets.upload(
            repeat_records(30),
            options={"validationFraction": 0.2, "removeNearDuplicates": False},
        )
        models = [
            {"name": name, "endpoint": {"baseUrl": stub.base_url, "model": name}}
            for name in ("mute", "parrot")
        ]
        job = client.evaluations.create(
            {"candidates": models, "dataset": dataset.name, "graders": [{"type": "exact_match"}]}
        )
        job = client.evaluations.wait(job.name, timeout=120)
    n = dataset.validation_record_count
    assert job.state == job.STATE_SUCCEEDED and n >= 4
    command = [str(TUNEFLEET), "eval", "annotate", job.name, "--candidate", "parrot"]
    environment = {"TUNEFLEET_TARGET": platform.target}
    terminal = Terminal(f"tunefleet-{id(platform)}", [*command, "--annotator", "ada"], environment)
    try:
        for left in range(n, 0, -1):
            screen = terminal.wait_for(rf"{left} left to judge, as ada(.|\n)*Which is better\?")
            second_panel = screen.index("─ 2 ─")
            if left == n:
                terminal.press("x")  # not an answer: ignored
                terminal.press("t")  # the first item: a tie
            else:
                terminal.press("1" if screen.index(MUTE) > second_panel else "2")
        screen = terminal.wait_for("EXITED 0")
        assert "Every item is judged" in screen
        assert f"{n - 1} wins, 0 losses, 1 ties from 1 annotators" in screen
    finally:
        terminal.close()

    # Another person looks at one pair and stops: nothing of theirs is recorded.
    terminal = Terminal(
        f"tunefleet-q-{id(platform)}", [*command, "--annotator", "bob"], environment
    )
    try:
        terminal.wait_for(rf"{n} left to judge, as bob")
        terminal.press("q")
        assert "from 1 annotators" in terminal.wait_for("EXITED 0")
    finally:
        terminal.close()
    with Client(platform.target) as client:
        tally = client.evaluations.annotation_summary(job.name, "parrot")
    assert (tally.wins, tally.losses, tally.ties, tally.annotators) == (n - 1, 0, 1, 1)
