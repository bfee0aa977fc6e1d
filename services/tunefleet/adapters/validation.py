"""What the registry accepts: file names, safetensors headers, adapter configurations, and tensors
that fit the base model. Every refusal is INVALID_ARGUMENT naming the file and a reason code.

The base model's modules come from its `config.json` alone: the model is instantiated on the
`meta` device (no weights, no memory), which gives every module's name and weight shape for any
architecture transformers knows.
"""

from __future__ import annotations

import functools
import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunefleet.core import kinds
from tunefleet.core.errors import InvalidArgument
from tunefleet.core.loading import LOADING

ADAPTER_CONFIG = "adapter_config.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy")
ALLOWED_NAMES = frozenset(
    {
        ADAPTER_CONFIG,
        "config.json",
        "generation_config.json",
        "model.safetensors.index.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "tokenizer.model",
        "vocab.json",
        "merges.txt",
        "added_tokens.json",
        "chat_template.jinja",
    }
)
MAX_HEADER_BYTES = 100 * 1024 * 1024
SAFETENSORS_DTYPES = frozenset(
    {
        "BOOL",
        "U8",
        "I8",
        "I16",
        "U16",
        "I32",
        "U32",
        "I64",
        "U64",
        "F16",
        "BF16",
        "F32",
        "F64",
        "F8_E4M3",
        "F8_E5M2",
    }
)
_LORA_TENSOR = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+?)\.(?P<kind>lora_A|lora_B|lora_embedding_A|"
    r"lora_embedding_B|lora_magnitude_vector)(?:\.(?P<part>weight|bias))?$"
)


def refuse(path: str, reason: str, message: str) -> InvalidArgument:
    return InvalidArgument(f"files[{path!r}]", message, reason=reason, metadata={"file": path})


def check_path(path: str) -> str:
    """A file path a version may contain: relative, no `..`, an allowed kind of file."""
    if not path or path.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", path):
        raise refuse(path, "PATH_NOT_ALLOWED", "absolute paths are not allowed")
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise refuse(path, "PATH_NOT_ALLOWED", "paths must not contain control characters")
    parts = tuple(path.split("/"))  # not PurePosixPath: it drops "." and empty parts
    if "\\" in path or any(part in ("..", ".", "") for part in parts) or len(parts) > 4:
        raise refuse(path, "PATH_NOT_ALLOWED", "paths must be relative, without '..' or '\\'")
    name = parts[-1]
    if name.lower().endswith(PICKLE_SUFFIXES):
        raise refuse(
            path,
            "PICKLED_WEIGHTS",
            "pickled weights can run code when loaded and are refused; save with safetensors "
            "(save_pretrained(..., safe_serialization=True))",
        )
    if not (
        name in ALLOWED_NAMES or name.endswith(".safetensors") or name.upper().startswith("README")
    ):
        raise refuse(
            path,
            "FILE_NOT_ALLOWED",
            "only adapter_config.json, *.safetensors, model configuration, tokenizer and README "
            "files are accepted",
        )
    return path


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]


def parse_safetensors_header(path: str, prefix: bytes, file_size: int) -> dict[str, TensorInfo]:
    """The tensors a safetensors file declares, from the first bytes of the file."""
    if len(prefix) < 8:
        raise refuse(path, "BAD_SAFETENSORS", "file is too short to be safetensors")
    (length,) = struct.unpack("<Q", prefix[:8])
    if length > MAX_HEADER_BYTES or 8 + length > file_size:
        raise refuse(path, "BAD_SAFETENSORS", f"header length {length} does not fit the file")
    if len(prefix) < 8 + length:
        raise ValueError("need more bytes")  # the caller reads further
    try:
        header = json.loads(prefix[8 : 8 + length])
    except ValueError:
        raise refuse(path, "BAD_SAFETENSORS", "header is not JSON") from None
    if not isinstance(header, dict):
        raise refuse(path, "BAD_SAFETENSORS", "header is not a JSON object")
    tensors: dict[str, TensorInfo] = {}
    data_size = file_size - 8 - length
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = (
                entry["dtype"],
                tuple(entry["shape"]),
                entry["data_offsets"],
            )
        except (KeyError, TypeError, ValueError):
            raise refuse(
                path, "BAD_SAFETENSORS", f"tensor {name!r} has a malformed entry"
            ) from None
        if dtype not in SAFETENSORS_DTYPES or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise refuse(path, "BAD_SAFETENSORS", f"tensor {name!r} has a bad dtype or shape")
        if not 0 <= start <= end <= data_size:
            raise refuse(path, "BAD_SAFETENSORS", f"tensor {name!r} lies outside the file")
        tensors[name] = TensorInfo(dtype, shape)
    return tensors


def header_length(prefix: bytes) -> int | None:
    """How many leading bytes hold the safetensors header, once 8 bytes are known."""
    return 8 + struct.unpack("<Q", prefix[:8])[0] if len(prefix) >= 8 else None


@dataclass
class Analysis:
    """What registration learned about a version."""

    kind: str  # "adapter" or "full_model"
    config: dict[str, Any] = field(default_factory=dict)  # AdapterConfigSummary as JSON
    compatibility: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ModuleInfo:
    kind: str  # the module class, for example "Linear" or "Embedding"
    weight_shape: tuple[int, ...]


@functools.cache
def base_modules(model_dir: Path) -> dict[str, ModuleInfo]:
    """Every module of the base model with a weight, from its config.json alone."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(model_dir))
    with LOADING, torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)  # type: ignore[no-untyped-call]
    return {
        name: ModuleInfo(type(module).__name__, tuple(module.weight.shape))
        for name, module in model.named_modules()
        if isinstance(getattr(module, "weight", None), torch.Tensor)
    }


def analyse(
    files: dict[str, int],
    config_text: bytes | None,
    tensors: dict[str, dict[str, TensorInfo]],
    modules: dict[str, ModuleInfo] | None,
    vllm_max_lora_rank: int,
) -> Analysis:
    """Check a version's files (path -> size), its adapter_config.json and the tensors of its
    safetensors files against the base model's modules (when known)."""
    weights = [p for p in files if p.endswith(".safetensors")]
    if config_text is None:
        if "config.json" in files and weights:
            return Analysis(
                "full_model",
                compatibility=[
                    {"engine": "SERVING_ENGINE_VLLM", "compatible": True, "reasons": []},
                    {"engine": "SERVING_ENGINE_PEFT", "compatible": True, "reasons": []},
                ],
                notes=["a full model: served as a base model of its own"],
            )
        raise refuse(
            ADAPTER_CONFIG,
            "MISSING_FILE",
            "an adapter needs adapter_config.json (a full model needs config.json)",
        )
    if "adapter_model.safetensors" not in files:
        raise refuse(
            "adapter_model.safetensors",
            "MISSING_FILE",
            "an adapter needs adapter_model.safetensors",
        )
    config = _adapter_config(config_text)
    pattern = config.get("rank_pattern") or {}
    ranks = [config.get("r", 0), *(pattern.values() if isinstance(pattern, dict) else [None])]
    if not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks):
        raise refuse(
            ADAPTER_CONFIG, "BAD_ADAPTER_CONFIG", "r and rank_pattern values must be integers"
        )
    summary: dict[str, Any] = {
        "peft_type": str(config.get("peft_type", "")),
        "rank": ranks[0],
        "alpha": float(config.get("lora_alpha", 0) or 0),
        "target_modules": _targets(config),
        "use_dora": bool(config.get("use_dora")),
        "use_rslora": bool(config.get("use_rslora")),
        "bias": str(config.get("bias", "none")),
        "modules_to_save": list(config.get("modules_to_save") or []),
        "lora_bias": bool(config.get("lora_bias")),
        "max_rank": max(ranks),
    }
    analysis = Analysis("adapter", config=summary)
    if summary["peft_type"] != "LORA":
        raise refuse(
            ADAPTER_CONFIG,
            "UNSUPPORTED_ADAPTER",
            f"peft_type {summary['peft_type']!r} is not supported; only LORA (with DoRA and "
            "rsLoRA variants)",
        )
    if summary["rank"] < 1:
        raise refuse(
            ADAPTER_CONFIG, "BAD_ADAPTER_CONFIG", "r (the rank) must be a positive integer"
        )
    _check_tensors(tensors.get("adapter_model.safetensors", {}), config, summary, modules, analysis)
    analysis.compatibility = kinds.compatibility(summary, vllm_max_lora_rank)
    if why := kinds.peft_own_batch(summary):
        analysis.notes.append(f"PEFT engine: {why}")
    return analysis


def _adapter_config(text: bytes) -> dict[str, Any]:
    try:
        config = json.loads(text)
    except ValueError as exc:
        raise refuse(ADAPTER_CONFIG, "BAD_ADAPTER_CONFIG", f"is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise refuse(ADAPTER_CONFIG, "BAD_ADAPTER_CONFIG", "must be a JSON object")
    return config


def _targets(config: dict[str, Any]) -> list[str]:
    targets = config.get("target_modules") or []
    return [targets] if isinstance(targets, str) else sorted(str(t) for t in targets)


def _check_tensors(
    tensors: dict[str, TensorInfo],
    config: dict[str, Any],
    summary: dict[str, Any],
    modules: dict[str, ModuleInfo] | None,
    analysis: Analysis,
) -> None:
    path = "adapter_model.safetensors"
    if not tensors:
        raise refuse(path, "BAD_SAFETENSORS", "contains no tensors")
    rank_pattern = config.get("rank_pattern") or {}
    adapted: set[str] = set()
    kinds_seen: set[str] = set()
    for name, info in sorted(tensors.items()):
        match = _LORA_TENSOR.match(name)
        module_name = (
            match["module"] if match else name.removeprefix("base_model.model.").rsplit(".", 1)[0]
        )
        # PEFT saves the base weight of an adapted embedding or output layer as
        # `<module>.base_layer.weight`.
        module_name = module_name.removesuffix(".base_layer")
        module = modules.get(module_name) if modules is not None else None
        if modules is not None and module is None:
            raise refuse(
                path,
                "TARGET_MODULE_MISSING",
                f"tensor {name!r} adapts module {module_name!r}, which the base model "
                "does not have",
            )
        if match is None:
            # A whole saved module (modules_to_save) or a bias: must match the base shape.
            if (
                module is not None
                and name.endswith(".weight")
                and info.shape != module.weight_shape
            ):
                raise refuse(
                    path,
                    "SHAPE_MISMATCH",
                    f"tensor {name!r} has shape {list(info.shape)}, the base model's "
                    f"{module_name} has {list(module.weight_shape)}",
                )
            continue
        adapted.add(module_name)
        if module is not None:
            kinds_seen.add(module.kind)
        if match["part"] == "bias":
            summary["lora_bias"] = True
            if match["kind"] != "lora_B" or (
                module is not None
                and module.kind == "Linear"
                and info.shape != module.weight_shape[:1]
            ):
                raise refuse(
                    path,
                    "SHAPE_MISMATCH",
                    f"tensor {name!r}: only lora_B has a bias, of the layer's output size",
                )
            continue
        rank = int(
            next((r for k, r in rank_pattern.items() if module_name.endswith(k)), summary["rank"])
        )
        if match["kind"] in ("lora_A", "lora_B") and len(info.shape) == 2:
            got_rank = info.shape[0] if match["kind"] == "lora_A" else info.shape[1]
            if got_rank != rank:
                raise refuse(
                    path,
                    "RANK_MISMATCH",
                    f"tensor {name!r} has rank {got_rank}, adapter_config.json says {rank}",
                )
        if module is None or module.kind != "Linear" or len(module.weight_shape) != 2:
            continue
        out_features, in_features = module.weight_shape
        expected = {
            "lora_A": (rank, in_features),
            "lora_B": (out_features, rank),
            "lora_magnitude_vector": (out_features,),
        }.get(match["kind"])
        if expected is not None and info.shape != expected:
            raise refuse(
                path,
                "SHAPE_MISMATCH",
                f"tensor {name!r} has shape {list(info.shape)}, expected {list(expected)} "
                f"for the base model's {module_name} ({in_features} -> {out_features})",
            )
    if modules is None:
        # Not servable until checked: an engine would serve what it cannot verify.
        summary["unchecked"] = "the base model is not known to the registry"
        analysis.notes.append("base model not available here: shapes not checked")
        return
    summary["target_kinds"] = sorted(kinds_seen)
    for target in summary["target_modules"]:
        if not any(m == target or m.endswith("." + target) for m in modules):
            raise refuse(
                ADAPTER_CONFIG,
                "TARGET_MODULE_MISSING",
                f"target module {target!r} does not exist in the base model",
            )
    if not adapted:
        raise refuse(path, "BAD_SAFETENSORS", "contains no LoRA tensors")
