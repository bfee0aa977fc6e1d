"""Evaluation throughput: EvaluationService (answers through InferenceService, whose engine
batches them) against lm-evaluation-harness's `hf` backend, on the same model, items, decoding
and grader, in the same run.

    python benchmarks/evaluation.py [--items 60] [--rounds 3] [--batch 8]

Both sides answer the first `--items` questions of the bundled general suite with
SmolLM2-135M-Instruct (the demo's model) in float32 on the CPU, greedily, through the chat
template, at most 32 tokens, and grade them by exact match after SQuAD's normalisation (lm-eval
through the task `tunefleet eval suite general --lm-eval` writes). lm-eval's model is loaded
once and generates `--batch` prompts at a time; EvaluationService keeps `--batch` requests in
flight (evaluation.concurrency) and its engine batches what arrives. After a warm-up of each on
8 items, rounds alternate the two sides in a rotating order (benchmarks/harness.py), every round
printed; the ratio of their speeds is printed as its median and range. Model loading and server
start are outside the timings.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import rotations, spread, warm_up  # noqa: E402
from tunefleet.client import Client  # noqa: E402
from tunefleet.demo import models  # noqa: E402
from tunefleet.demo.server import LocalServer  # noqa: E402
from tunefleet.suites import general, jsonl, write_lm_eval_task  # noqa: E402

MAX_TOKENS = 32  # the lm-eval task's max_gen_toks


def tunefleet_round(client: Client, dataset: str, items: int) -> tuple[float, float]:
    """Seconds from creating the job to its end, and its accuracy."""
    started = time.perf_counter()
    job = client.evaluations.create(
        {
            "candidates": [{"name": "base"}],
            "dataset": dataset,
            "split": "DATASET_SPLIT_TRAIN",
            "maxItems": items,
            "sampling": {"maxTokens": MAX_TOKENS},
            "graders": [{"type": "exact_match", "normalise": True}],
        }
    )
    job = client.evaluations.wait(job.name, timeout=3600)
    seconds = time.perf_counter() - started
    assert job.state == job.STATE_SUCCEEDED, job.error_message
    return seconds, job.results[0].scores[0].mean


def lm_eval_round(model: Any, manager: Any, items: int) -> tuple[float, float]:
    from lm_eval import simple_evaluate

    started = time.perf_counter()
    results = simple_evaluate(
        model=model,
        tasks=["tunefleet_general"],
        task_manager=manager,
        limit=items,
        apply_chat_template=True,
        log_samples=False,
    )
    seconds = time.perf_counter() - started
    assert results is not None
    accuracy = results["results"]["tunefleet_general"]["exact_match,none"]
    return seconds, float(accuracy)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--items", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    args = parser.parse_args()

    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    path = models.smollm2(models.cache_dir())
    scratch = Path(tempfile.mkdtemp(prefix="tunefleet-bench-evaluation-"))
    write_lm_eval_task(scratch / "task")
    manager = TaskManager(include_path=str(scratch / "task"))
    lm = HFLM(pretrained=str(path), dtype="float32", device="cpu", batch_size=args.batch)
    settings = {
        "models": {models.SMOLLM2: str(path)},
        "inference": {"base_model": models.SMOLLM2},
        "evaluation": {"concurrency": args.batch},
        "logging": {"level": "WARNING"},
    }
    print(f"{args.items} items of the general suite, SmolLM2-135M-Instruct, batch {args.batch}")
    with LocalServer(scratch / "server", settings) as server, Client(server.target) as client:
        options = {"validationFraction": 0, "removeNearDuplicates": False}
        dataset = client.datasets.upload(jsonl(general()), options=options).name

        def run(side: str, number: int | str, items: int) -> float:
            if side == "tunefleet":
                seconds, accuracy = tunefleet_round(client, dataset, items)
            else:
                seconds, accuracy = lm_eval_round(lm, manager, items)
            print(
                f"round {number:<7} {side:<11} {seconds:7.1f} s  {items / seconds:6.2f} "
                f"items/s  exact match {accuracy:.3f}",
                flush=True,
            )
            return items / seconds

        sides = ["tunefleet", "lm-eval hf"]
        warm_up(sides, lambda side: run(side, "warm-up", 8))
        ratios = []
        for number, order in rotations(sides, args.rounds):
            speed = {side: run(side, number, args.items) for side in order}
            ratios.append(speed["tunefleet"] / speed["lm-eval hf"])
    print(f"tunefleet items/s / lm-eval hf items/s over {args.rounds} rounds: {spread(ratios)}")


if __name__ == "__main__":
    main()
