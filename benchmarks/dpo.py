"""DPO benchmark: tunefleet's trainer against TRL's DPOTrainer with PEFT, on the same small model,
preference pairs and hyperparameters, in the same run.

    python benchmarks/dpo.py [--pairs 192] [--rounds 3]

Both read each pair once (one epoch of `--pairs` pairs, micro batch 8): LoRA r=16 on all linear
layers, beta 0.1, lr 5e-6 with warmup and cosine decay, fp32, on CPU here; both take the
reference model to be the base with the adapter disabled (TRL's choice for PEFT models too) and
read a pair's two answers in one forward pass. Throughput is useful (non-padding) tokens per
second of the training loop, chosen and rejected rows both counted, as each side counts them;
memory is the peak RSS of the process that trained (each run has its own process). TRL runs
twice: with its defaults (gradient checkpointing on: less activation memory, a second forward
pass per step) and in tunefleet's memory regime (gradient checkpointing off). After a warm-up of
each on 16 pairs, the three alternate over `--rounds` rounds in a rotating order
(benchmarks/harness.py), every round printed; each ratio is printed as its median and range.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import rotations, spread, warm_up  # noqa: E402
from benchmarks.train import (  # noqa: E402
    SMALL,
    build_model,
    timed_tokens_per_second,
    trl_arguments,
    trl_lora,
)

BATCH, MAX_LENGTH, LEARNING_RATE, BETA = 8, 512, 5e-6, 0.1


def build_pairs(path: Path, count: int) -> Path:
    """Pairs whose answers differ in length and wording (10 to 120 words each), as
    DatasetService writes a preference dataset."""
    from tests.datasets.records import sentence

    rng = random.Random(0)
    with path.open("w") as out:
        for _ in range(count):
            record = {
                "messages": [
                    {"role": "user", "content": "Explain " + sentence(rng, rng.randint(5, 15))}
                ],
                "chosen": [{"role": "assistant", "content": sentence(rng, rng.randint(10, 120))}],
                "rejected": [{"role": "assistant", "content": sentence(rng, rng.randint(10, 120))}],
                "split": "train",
            }
            out.write(json.dumps(record) + "\n")
    return path


def run_tunefleet(model: Path, data: Path, workdir: Path) -> dict[str, Any]:
    from tunefleet.trainer.spec import parse_spec
    from tunefleet.trainer.train import Trainer

    spec = parse_spec(
        {
            "base_model": str(model),
            "method": "lora",
            "objective": "dpo",
            "dpo": {"beta": BETA},
            "lora": {"rank": 16, "dropout": 0.0, "target_modules": "all-linear"},
            "hyperparameters": {
                "learning_rate": LEARNING_RATE,
                "epochs": 1,
                "micro_batch_size": BATCH,
                "max_sequence_length": MAX_LENGTH,
                "precision": "fp32",
                "seed": 1,
            },
            "train_data": {"uri": str(data)},
            "output_dir": str(workdir / "out"),
        }
    )
    trainer = Trainer(spec)
    result = trainer.run()
    trainer.reporter.close()
    events = [json.loads(line) for line in (workdir / "out" / "progress.jsonl").open()]
    last = [e for e in events if e["event"] == "progress"][-1]
    return {
        "tokens_per_second": last["tokens_per_second"],
        "train_loss": last["train_loss"],
        "pairs": result["examples"],
    }


def run_trl(model: Path, data: Path, workdir: Path, defaults: bool) -> dict[str, Any]:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer  # type: ignore[attr-defined]

    datasets.disable_progress_bars()
    records = [json.loads(line) for line in data.open()]
    dataset = datasets.Dataset.from_list(
        [
            {"prompt": r["messages"], "chosen": r["chosen"], "rejected": r["rejected"]}
            for r in records
        ]
    )
    config = DPOConfig(
        num_train_epochs=1,
        learning_rate=LEARNING_RATE,
        beta=BETA,
        **trl_arguments(workdir, BATCH, MAX_LENGTH, defaults),
    )
    trainer = DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(str(model)),
        args=config,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(str(model)),
        peft_config=trl_lora(),
    )
    tokens_per_second = timed_tokens_per_second(trainer)
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    return {"tokens_per_second": tokens_per_second, "train_loss": losses[-1], "pairs": len(records)}


def child(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        if args.child == "tunefleet":
            result = run_tunefleet(args.model, args.data, workdir)
        else:
            result = run_trl(args.model, args.data, workdir, defaults=args.child == "trl")
    result["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    args.out.write_text(json.dumps(result))


def spawn(name: str, model: Path, data: Path, out: Path) -> dict[str, Any]:
    command = [sys.executable, __file__, "--child", name, "--model", str(model)]
    subprocess.run(
        [*command, "--data", str(data), "--out", str(out)],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    result: dict[str, Any] = json.loads(out.read_text())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=192)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        model = build_model(directory / "small", SMALL)
        data = build_pairs(directory / "pairs.jsonl", args.pairs)
        print(
            f"model: Llama {SMALL}; {args.pairs} pairs (answers of 10-120 words), one epoch, "
            f"micro batch {BATCH}",
            flush=True,
        )
        sides = {
            "tunefleet": "tunefleet DPO",
            "trl": "TRL DPOTrainer, defaults",
            "trl-same-memory": "TRL, no grad. checkpointing",
        }
        print(f"{'round':<9}{'trainer':<30}{'tokens/s':>10}{'peak MiB':>10}{'last loss':>11}")

        def run(name: str, number: int | str, pairs: Path) -> dict[str, Any]:
            result = spawn(name, model, pairs, directory / f"{name}-{number}.json")
            print(
                f"{number:<9}{sides[name]:<30}{result['tokens_per_second']:>10,.0f}"
                f"{result['peak_mib']:>10,.0f}{result['train_loss']:>11.4f}",
                flush=True,
            )
            return result

        few = build_pairs(directory / "warm-up.jsonl", 16)
        warm_up(list(sides), lambda name: run(name, "warm-up", few))
        ratios: dict[str, list[float]] = {"trl": [], "trl-same-memory": []}
        memory: dict[str, list[float]] = {"trl": [], "trl-same-memory": []}
        for number, order in rotations(list(sides), args.rounds):
            results = {name: run(name, number, data) for name in order}
            for name in ratios:
                ours, theirs = results["tunefleet"], results[name]
                ratios[name].append(ours["tokens_per_second"] / theirs["tokens_per_second"])
                memory[name].append(ours["peak_mib"] / theirs["peak_mib"])
        for name, values in ratios.items():
            print(
                f"tunefleet / {sides[name]}: throughput {spread(values)}, "
                f"peak memory {spread(memory[name], unit='')}",
                flush=True,
            )


if __name__ == "__main__":
    main()
