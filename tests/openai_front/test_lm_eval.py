"""lm-evaluation-harness's `local-completions` model against the front's /v1/completions scores a
multiple-choice task as lm-eval's own `hf` backend does on the same model: the same answers, and
log-likelihoods within 1e-3. A server that ignored `echo` or `logprobs` would score at chance."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest

from tests.inference.conftest import Served
from tests.openai_front.conftest import Front
from tests.trainer.conftest import ANIMALS, COLOURS

TASK = """\
task: colours_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Which colour goes with the {{{{animal}}}}? Colour:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: acc
"""


def write_task(directory: Path) -> None:
    """20 questions, four choices each (answers drawn from the colours)."""
    directory.mkdir()
    lines = []
    for index in range(20):
        animal = ANIMALS[index % len(ANIMALS)]
        choices = [f" {COLOURS[(index + k) % len(COLOURS)]}" for k in range(4)]
        lines.append(json.dumps({"animal": animal, "choices": choices, "answer": index % 4}))
    (directory / "colours.jsonl").write_text("\n".join(lines) + "\n")
    (directory / "colours_mc.yaml").write_text(
        TASK.format(data=json.dumps(str(directory / "colours.jsonl")))
    )


def evaluate(directory: Path, model: str, model_args: dict[str, Any]) -> tuple[float, list[Any]]:
    """Accuracy and each request's (log-likelihood, greedy) in document order."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    results = simple_evaluate(
        model=model,
        model_args=model_args,
        tasks=["colours_mc"],
        task_manager=TaskManager(include_path=str(directory)),
        log_samples=True,
        batch_size=1,
    )
    assert results is not None
    samples = sorted(results["samples"]["colours_mc"], key=lambda s: s["doc_id"])
    responses = [r[0] for sample in samples for r in sample["resps"]]
    return results["results"]["colours_mc"]["acc,none"], responses


@pytest.mark.parametrize("adapter", [None, "alpha"])
async def test_local_completions_scores_as_the_hf_backend(
    front: Front,
    served: Served,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    adapter: str | None,
) -> None:
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    write_task(tmp_path / "task")
    model = "tiny"
    hf_args: dict[str, Any] = {"pretrained": str(served.model), "dtype": "float32", "device": "cpu"}
    if adapter is not None:
        version = await front.serving.register("orders", served.adapters[adapter])
        await front.serving.alias("prod", version)
        model, hf_args["peft"] = "orders@prod", str(served.adapters[adapter])
    api_args = {
        "model": model,
        "base_url": f"{front.base_url}/completions",
        "tokenizer": str(served.model),
        "tokenizer_backend": "huggingface",
        "max_length": 256,
    }
    # lm-eval's clients block: they run in threads, while the front answers on this loop.
    ours = await asyncio.to_thread(evaluate, tmp_path / "task", "local-completions", api_args)
    theirs = await asyncio.to_thread(evaluate, tmp_path / "task", "hf", hf_args)
    assert ours[0] == theirs[0]
    assert len(ours[1]) == len(theirs[1]) == 80
    assert len({round(ll, 2) for ll, _ in ours[1]}) > 20  # real scores, not a constant
    for (our_ll, our_greedy), (their_ll, their_greedy) in zip(ours[1], theirs[1], strict=True):
        assert our_ll == pytest.approx(their_ll, abs=1e-3)
        assert our_greedy == their_greedy
    worst = max(abs(a[0] - b[0]) for a, b in zip(ours[1], theirs[1], strict=True))
    print(f"{model}: accuracy {ours[0]:.2f} both; log-likelihoods differ by at most {worst:.1e}")
    if adapter is not None:  # the adapter was applied on both sides, not on neither
        base = await asyncio.to_thread(
            evaluate, tmp_path / "task", "local-completions", {**api_args, "model": "tiny"}
        )
        assert max(abs(a[0] - b[0]) for a, b in zip(ours[1], base[1], strict=True)) > 0.1
