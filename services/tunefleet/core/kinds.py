"""Which adapter kinds each serving engine serves exactly: the one source of truth for the
registry's per-engine compatibility report and for the engines' own checks before loading.

Both read an adapter's summary as the registry stores it (`AdapterConfigSummary` as JSON: the
fields of adapter_config.json and what the tensors showed). Versions registered before a field
existed read its default.
"""

from __future__ import annotations

from typing import Any

# The PEFT engine serves these kinds through PEFT's own forward, one adapter per batch: its
# stacked multi-adapter path adds the LoRA delta of linear layers only.
_OWN_BATCH = "served through PEFT's own forward, one adapter per batch"


def max_rank(summary: dict[str, Any]) -> int:
    return int(summary.get("max_rank") or summary.get("rank") or summary.get("r") or 0)


def _unchecked(summary: dict[str, Any]) -> str | None:
    if summary.get("unchecked"):
        return f"not checked against the base model ({summary['unchecked']})"
    return None


def vllm_refusal(summary: dict[str, Any], max_lora_rank: int) -> str | None:
    """Why vLLM cannot serve this adapter exactly, or None."""
    return "; ".join(vllm_reasons(summary, max_lora_rank)) or None


def vllm_reasons(summary: dict[str, Any], max_lora_rank: int) -> list[str]:
    if why := _unchecked(summary):
        return [why]
    if summary.get("peft_type", "LORA") != "LORA":
        return [f"vLLM serves LoRA adapters, not {summary.get('peft_type')}"]
    reasons = []
    if summary.get("use_dora"):
        reasons.append("DoRA adapters are not supported by vLLM (serve with PEFT, or merge)")
    if summary.get("bias", "none") != "none":
        reasons.append(f"trained biases (bias={summary['bias']}) are not supported by vLLM")
    if summary.get("lora_bias"):
        reasons.append("LoRA bias (lora_bias) is not supported by vLLM")
    if summary.get("modules_to_save"):
        saved = ", ".join(summary["modules_to_save"])
        reasons.append(f"modules_to_save ({saved}) is not supported by vLLM")
    if set(summary.get("target_kinds") or ["Linear"]) - {"Linear"}:
        kinds = ", ".join(sorted(set(summary["target_kinds"]) - {"Linear"}))
        reasons.append(f"LoRA on {kinds} layers is not supported by vLLM (linear layers only)")
    if max_rank(summary) > max_lora_rank:
        reasons.append(f"rank {max_rank(summary)} is above vLLM's max_lora_rank {max_lora_rank}")
    return reasons


def peft_refusal(summary: dict[str, Any]) -> str | None:
    """Why the PEFT engine cannot serve this adapter exactly, or None."""
    if why := _unchecked(summary):
        return why
    if summary.get("peft_type", "LORA") != "LORA":
        return f"the PEFT engine serves LoRA adapters, not {summary.get('peft_type')}"
    if summary.get("bias", "none") != "none":
        return (
            f"trained base-layer biases (bias={summary['bias']}) would change the base model for "
            "every request on the engine: merge the adapter into a full model to serve it"
        )
    return None


def peft_own_batch(summary: dict[str, Any]) -> str | None:
    """Why the PEFT engine serves this adapter through PEFT's own forward (batched only with
    requests for itself) instead of the stacked multi-adapter path, or None."""
    reasons = []
    if summary.get("use_dora"):
        reasons.append("DoRA")
    if summary.get("lora_bias"):
        reasons.append("LoRA bias")
    if summary.get("modules_to_save"):
        reasons.append("modules_to_save")
    if set(summary.get("target_kinds") or ["Linear"]) - {"Linear"}:
        reasons.append("LoRA on non-linear layers")
    return f"{', '.join(reasons)}: {_OWN_BATCH}" if reasons else None


def compatibility(summary: dict[str, Any], vllm_max_lora_rank: int) -> list[dict[str, Any]]:
    """The registry's compatibility report: per engine, whether it serves the adapter exactly."""
    peft = peft_refusal(summary)
    return [
        {"engine": engine, "compatible": not reasons, "reasons": reasons}
        for engine, reasons in (
            ("SERVING_ENGINE_VLLM", vllm_reasons(summary, vllm_max_lora_rank)),
            ("SERVING_ENGINE_PEFT", [peft] if peft else []),
        )
    ]
