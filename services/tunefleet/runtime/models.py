"""The models the platform knows: names from the settings' `models` catalogue, or local paths."""

from __future__ import annotations

import contextlib
from pathlib import Path

from tunefleet.runtime.errors import InvalidArgument

# What a model directory holds: transformers' config.json, or a tokenizer's own configuration.
MODEL_FILES = ("config.json", "tokenizer_config.json", "tokenizer.json")


def resolve_model(name: str, catalogue: dict[str, Path], field: str) -> Path:
    """A model name the platform knows (the settings' `models` catalogue) or a local directory;
    INVALID_ARGUMENT naming `field` otherwise."""
    if name in catalogue:
        return catalogue[name]
    if name and _looks_like_model(Path(name).expanduser()):
        return Path(name).expanduser()
    known = ", ".join(sorted(catalogue)) or "none configured"
    raise InvalidArgument(
        field, f"{name!r} is neither a known model ({known}) nor a local model directory"
    )


def _looks_like_model(path: Path) -> bool:
    """A directory holding a model's or a tokenizer's configuration (any other path, however
    odd, is not one: the caller says so in the same words whether it exists or not)."""
    try:
        return any((path / name).is_file() for name in MODEL_FILES)
    except (OSError, ValueError):  # a name too long, a NUL
        return False


def find_model(name: str, catalogue: dict[str, Path]) -> Path | None:
    """Like resolve_model, but None when the model is not available here."""
    try:
        return resolve_model(name, catalogue, "base_model")
    except InvalidArgument:
        return None


def preload_transformers() -> None:
    """Resolve the transformers names that services use from worker threads, in this thread.

    transformers 5 resolves its top-level names lazily, and two threads resolving names at the
    same moment can fail with "cannot import name 'AutoModelForCausalLM' from 'transformers'":
    seen when an upload's token count and the inference engine's model load ran at once.
    """
    try:
        import transformers
    except ImportError:  # pragma: no cover - the server extra installs it
        return
    for name in ("AutoConfig", "AutoTokenizer", "AutoModelForCausalLM"):
        # Without torch the models are unavailable, and never used then.
        with contextlib.suppress(ImportError, AttributeError):
            getattr(transformers, name)
