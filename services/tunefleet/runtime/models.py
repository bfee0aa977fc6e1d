"""The models the platform knows: names from the settings' `models` catalogue, or local paths
where the settings allow them."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tunefleet.core.errors import InvalidArgument

if TYPE_CHECKING:
    from tunefleet.runtime.settings import Settings

# What a model directory holds: transformers' config.json, or a tokenizer's own configuration.
MODEL_FILES = ("config.json", "tokenizer_config.json", "tokenizer.json")


@dataclass(frozen=True)
class ModelCatalogue:
    """Models by name, and which local directories a request may name instead.

    `roots` None: any local model directory (the embedded shape, auth off: whoever calls owns
    the machine). Otherwise only directories under one of `roots` (none: names only), so a caller
    can neither read another team's model nor probe the server's file system.
    """

    named: Mapping[str, Path] = field(default_factory=dict)
    roots: tuple[Path, ...] | None = None

    @classmethod
    def of(cls, settings: Settings) -> ModelCatalogue:
        if not settings.server.auth.enabled:
            return cls(dict(settings.models))
        return cls(dict(settings.models), tuple(settings.model_roots))

    def resolve(self, name: str, field: str) -> Path:
        """The directory of a known model name or an allowed local directory; INVALID_ARGUMENT
        naming `field` otherwise, in the same words whether the path exists or not."""
        if name in self.named:
            return self.named[name]
        path = self._local(name)
        if path is not None:
            return path
        known = ", ".join(sorted(self.named)) or "none configured"
        if self.roots is None:
            why = f"{name!r} is neither a known model ({known}) nor a local model directory"
        elif self.roots:
            why = f"{name!r} is neither a known model ({known}) nor a model under the allowed roots"
        else:
            why = f"{name!r} is not a known model ({known})"
        raise InvalidArgument(field, why)

    def find(self, name: str) -> Path | None:
        """Like resolve, but None when the model is not available here."""
        try:
            return self.resolve(name, "base_model")
        except InvalidArgument:
            return None

    def _local(self, name: str) -> Path | None:
        if not name or self.roots == ():
            return None
        try:
            path = Path(name).expanduser()
            if self.roots is not None:
                path = path.resolve()  # links and `..` cannot leave a root
                if not any(path.is_relative_to(root.resolve()) for root in self.roots):
                    return None
            # A directory holding a model's or a tokenizer's configuration (any other path,
            # however odd, is not one).
            return path if any((path / file).is_file() for file in MODEL_FILES) else None
        except (OSError, ValueError, RuntimeError):  # a name too long, a NUL, a link loop
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
