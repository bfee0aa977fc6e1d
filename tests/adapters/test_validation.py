"""Registration checks real PEFT adapters: compatibility reports, and specific refusals."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from safetensors.torch import load_file, save_file

from tests.adapters.conftest import MakeAdapter
from tunefleet.adapters.manager import AdapterManager
from tunefleet.core.errors import InvalidArgument


def upload(
    registry: AdapterManager,
    directory: Path,
    adapter: str = "support",
    extra: dict[str, bytes] | None = None,
) -> Any:
    upload = registry.begin_upload(f"adapters/{adapter}", "", {})
    try:
        files = {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}
        for path, content in {**files, **(extra or {})}.items():
            upload.start_file(path, len(content), "")
            upload.write(content)
        return registry.finish_upload(upload)
    finally:
        upload.discard()


@pytest.fixture
def tiny(registry: AdapterManager) -> AdapterManager:
    registry.create_adapter("support", "tiny-llama", "", {})
    return registry


def engines(row: Any) -> dict[str, tuple[bool, list[str]]]:
    return {e["engine"]: (e["compatible"], e["reasons"]) for e in row.compatibility["engines"]}


@pytest.mark.parametrize(
    ("lora", "vllm_ok", "reason"),
    [
        ({}, True, ""),  # all-linear LoRA
        ({"use_rslora": True}, True, ""),
        ({"target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}, True, ""),
        ({"use_dora": True, "target_modules": ["q_proj", "v_proj"]}, False, "DoRA"),
        ({"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}, False, "modules_to_save"),
        ({"r": 128, "target_modules": ["q_proj"]}, False, "max_lora_rank 64"),
    ],
    ids=["lora", "rslora", "attention-only", "dora", "modules-to-save", "rank-128"],
)
def test_compatibility_report(
    tiny: AdapterManager,
    make_adapter: MakeAdapter,
    lora: dict[str, Any],
    vllm_ok: bool,
    reason: str,
) -> None:
    row = upload(tiny, make_adapter(**lora))
    report = engines(row)
    assert report["SERVING_ENGINE_PEFT"] == (True, [])
    assert report["SERVING_ENGINE_VLLM"][0] is vllm_ok
    if reason:
        assert any(reason in r for r in report["SERVING_ENGINE_VLLM"][1])
    assert row.smoke_test["result"] == "RESULT_PASSED"
    assert row.smoke_test["max_logit_change"] > 0
    assert row.kind == "adapter" and row.config["rank"] == lora.get("r", 8)


def refusal(tiny: AdapterManager, directory: Path, **kwargs: Any) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as raised:
        upload(tiny, directory, **kwargs)
    return raised.value


def test_pickled_weights_are_refused(tiny: AdapterManager, make_adapter: MakeAdapter) -> None:
    error = refusal(tiny, make_adapter(), extra={"adapter_model.bin": b"\x80\x04pickle"})
    assert error.reason == "PICKLED_WEIGHTS"
    assert error.field == "files['adapter_model.bin']"


@pytest.mark.parametrize(
    "path",
    [
        "../adapter_config.json",
        "/etc/passwd",
        "a/../../b.safetensors",
        "./adapter_model.safetensors",  # another name for a file of the version
        "a//b.safetensors",
        "adapter\x00model.safetensors",
        "README\n.md",
    ],
)
def test_path_traversal_is_refused(
    tiny: AdapterManager, make_adapter: MakeAdapter, path: str
) -> None:
    error = refusal(tiny, make_adapter(), extra={path: b"{}"})
    assert error.reason == "PATH_NOT_ALLOWED" and repr(path) in error.field


def test_unexpected_files_are_refused(tiny: AdapterManager, make_adapter: MakeAdapter) -> None:
    assert refusal(tiny, make_adapter(), extra={"run.sh": b"rm -rf /"}).reason == "FILE_NOT_ALLOWED"


def test_shape_mismatch_is_refused(tiny: AdapterManager, make_adapter: MakeAdapter) -> None:
    other = make_adapter(model={"hidden_size": 64, "intermediate_size": 128})
    error = refusal(tiny, other)
    assert error.reason == "SHAPE_MISMATCH"
    assert "expected" in error.description and "adapter_model.safetensors" in error.field


def test_missing_target_module_is_refused(
    tiny: AdapterManager, make_adapter: MakeAdapter, tmp_path: Path
) -> None:
    source = make_adapter(target_modules=["q_proj"])
    broken = tmp_path / "broken"
    shutil.copytree(source, broken)
    tensors = load_file(broken / "adapter_model.safetensors")
    save_file(
        {k.replace("q_proj", "qkv_proj"): v for k, v in tensors.items()},
        broken / "adapter_model.safetensors",
    )
    config = json.loads((broken / "adapter_config.json").read_text())
    config["target_modules"] = ["qkv_proj"]
    (broken / "adapter_config.json").write_text(json.dumps(config))
    error = refusal(tiny, broken)
    assert error.reason == "TARGET_MODULE_MISSING"
    assert "qkv_proj" in error.description


def test_an_adapter_that_changes_nothing_is_refused(
    tiny: AdapterManager, make_adapter: MakeAdapter
) -> None:
    error = refusal(tiny, make_adapter(init_lora_weights=True))  # lora_B starts at zero
    assert error.reason == "NO_EFFECT"


def test_corrupt_safetensors_is_refused(
    tiny: AdapterManager, make_adapter: MakeAdapter, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(make_adapter(), broken)
    (broken / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    assert refusal(tiny, broken).reason == "BAD_SAFETENSORS"


def test_rank_that_contradicts_the_config_is_refused(
    tiny: AdapterManager, make_adapter: MakeAdapter, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(make_adapter(target_modules=["q_proj"]), broken)
    config = json.loads((broken / "adapter_config.json").read_text())
    config["r"] = 4
    (broken / "adapter_config.json").write_text(json.dumps(config))
    error = refusal(tiny, broken)
    assert error.reason == "RANK_MISMATCH" and "rank 8" in error.description


def test_file_size_limit(registry: AdapterManager, make_adapter: MakeAdapter) -> None:
    from dataclasses import replace

    from tunefleet.core.errors import ResourceExhausted

    registry.settings = replace(registry.settings, max_file_bytes=10_000)
    registry.create_adapter("support", "tiny-llama", "", {})
    with pytest.raises(ResourceExhausted) as raised:
        upload(registry, make_adapter())
    assert raised.value.reason == "FILE_TOO_LARGE"
    assert raised.value.metadata["file"] == "adapter_model.safetensors"


def test_adapters_are_listed_by_base_model_and_label(registry: AdapterManager) -> None:
    registry.create_adapter("a", "tiny-llama", "", {"team": "ml"})
    registry.create_adapter("b", "other-model", "", {"team": "ops"})
    registry.create_adapter("c", "tiny-llama", "", {"team": "ops"})
    by_base = registry.list_adapters('base_model = "tiny-llama"', 10, "")
    assert [a.id for a in by_base.items] == ["a", "c"]
    by_both = registry.list_adapters('base_model = "tiny-llama" AND labels.team = "ops"', 10, "")
    assert [a.id for a in by_both.items] == ["c"]
    first = registry.list_adapters("", 2, "")
    rest = registry.list_adapters("", 2, first.next_page_token)
    assert [a.id for a in first.items + rest.items] == ["a", "b", "c"]
