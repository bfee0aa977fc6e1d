"""Token counts with a base model's tokenizer and chat template.

A conversation's tokens are those of its full rendering; its trainable tokens are those of its
assistant turns, measured as the growth of the rendering when each assistant turn is added to
the prompt that precedes it (generation prompt included), which works with any chat template.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from typing import Any

from tunefleet.core.errors import InvalidArgument
from tunefleet.datasets.formats import Message

log = logging.getLogger(__name__)


@functools.cache
def _load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as error:
        # transformers' words name server paths: the log has them, the caller does not.
        log.warning("cannot load the tokenizer in %s: %s", path, error)
        raise InvalidArgument("options.tokenizer_model", "its tokenizer cannot be loaded") from None
    if not getattr(tokenizer, "chat_template", None):
        raise InvalidArgument("options.tokenizer_model", "its tokenizer has no chat template")
    return tokenizer


class TokenCounter:
    """Measures conversations with one tokenizer; call it with a batch of conversations."""

    def __init__(self, path: Path) -> None:
        self.tokenizer = _load_tokenizer(path)

    def _render(self, messages: list[Message], generation_prompt: bool) -> str:
        plain = [{"role": m["role"], "content": m["content"]} for m in messages]
        text: str = self.tokenizer.apply_chat_template(
            plain, tokenize=False, add_generation_prompt=generation_prompt
        )
        return text

    def __call__(self, conversations: list[list[Message]]) -> list[tuple[int, int]]:
        texts: list[str] = []
        spans: list[tuple[int, list[tuple[int, int]]]] = []
        for messages in conversations:
            full = len(texts)
            texts.append(self._render(messages, False))
            turns = []
            for index, message in enumerate(messages):
                if message["role"] == "assistant" and message.get("weight", 1) != 0:
                    turns.append((len(texts), len(texts) + 1))
                    texts.append(self._render(messages[:index], True))
                    texts.append(self._render(messages[: index + 1], False))
            spans.append((full, turns))
        counts = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        return [
            (counts[full], sum(max(0, counts[after] - counts[before]) for before, after in turns))
            for full, turns in spans
        ]
