"""Training benchmark: tunefleet's trainer against TRL's SFTTrainer with PEFT, on the same small
model, data and hyperparameters, in the same run; and QLoRA against LoRA peak memory.

    python benchmarks/train.py [--steps 24] [--rounds 5]

Throughput is useful (non-padding) tokens per second of the training loop; memory is the peak
RSS of the process that trained (each run has its own process). All use LoRA r=16 on all linear
layers, lr 2e-4 with warmup and cosine decay, micro batch 8, fp32, on CPU here. TRL runs twice:
with its defaults (which turn on gradient checkpointing: less activation memory, a second forward
pass per step) and in tunefleet's memory regime (gradient checkpointing off). The three alternate
over `--rounds` rounds after a warm-up of each (benchmarks/harness.py), in a rotating order,
every round printed; each ratio is printed as its median and range.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.harness import rotations, spread, warm_up  # noqa: E402

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SMALL: dict[str, Any] = {
    "hidden_size": 256,
    "intermediate_size": 688,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
}
LARGER: dict[str, Any] = {
    "hidden_size": 1024,
    "intermediate_size": 2816,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
}


def build_model(directory: Path, shape: dict[str, Any], vocab_size: int = 0) -> Path:
    """A random Llama of `shape` with a small byte-level BPE tokenizer (a `vocab_size` above the
    tokenizer's gives the output layer a real model's width; the ids above go unused)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    sys.path.insert(0, str(ROOT))
    from tests.datasets.records import WORDS

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|pad|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=2000,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([" ".join(WORDS)] * 50, trainer)
    fast = PreTrainedTokenizerFast(  # type: ignore[no-untyped-call]
        tokenizer_object=tokenizer, eos_token="<|end|>", pad_token="<|pad|>"
    )
    fast.chat_template = TEMPLATE
    fast.save_pretrained(directory)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=max(vocab_size, len(fast)),
        max_position_embeddings=1024,
        pad_token_id=fast.pad_token_id,
        eos_token_id=fast.eos_token_id,
        **shape,
    )
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    return directory


def build_data(path: Path, count: int) -> Path:
    """Conversations of very different lengths (answers of 10 to 200 words)."""
    sys.path.insert(0, str(ROOT))
    from tests.datasets.records import sentence

    rng = random.Random(0)
    with path.open("w") as out:
        for index in range(count):
            messages = [
                {"role": "user", "content": "Explain " + sentence(rng, rng.randint(5, 15))},
                {"role": "assistant", "content": sentence(rng, rng.randint(10, 200))},
            ]
            out.write(json.dumps({"index": index, "messages": messages, "split": "train"}) + "\n")
    return path


# --- runs, each in its own process ------------------------------------------------------------


def run_tunefleet(
    model: Path,
    data: Path,
    steps: int,
    method: str,
    workdir: Path,
    max_length: int,
    batch: int,
    precision: str = "fp32",
) -> dict[str, Any]:
    from tunefleet.trainer.spec import parse_spec
    from tunefleet.trainer.train import Trainer

    spec = parse_spec(
        {
            "base_model": str(model),
            "method": method,
            "lora": {"rank": 16, "dropout": 0.0, "target_modules": "all-linear"},
            "hyperparameters": {
                "learning_rate": 2e-4,
                "max_steps": steps,
                "epochs": 100,
                "micro_batch_size": batch,
                "max_sequence_length": max_length,
                "precision": precision,
                "seed": 1,
            },
            "train_data": {"uri": str(data)},
            "output_dir": str(workdir / "out"),
        }
    )
    trainer = Trainer(spec)
    trainer.run()
    trainer.reporter.close()
    events = [json.loads(line) for line in (workdir / "out" / "progress.jsonl").open()]
    last = [e for e in events if e["event"] == "progress"][-1]
    result = json.loads((workdir / "out" / "result.json").read_text())
    return {
        "tokens_per_second": last["tokens_per_second"],
        "model_mib": result["model_memory_bytes"] / 2**20,
    }


def run_trl(
    model: Path,
    data: Path,
    steps: int,
    workdir: Path,
    max_length: int,
    batch: int,
    defaults: bool = True,
    precision: str = "fp32",
) -> dict[str, Any]:
    import datasets
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer  # type: ignore[attr-defined]

    datasets.disable_progress_bars()
    records = [json.loads(line) for line in data.open()]
    dataset = datasets.Dataset.from_list([{"messages": r["messages"]} for r in records])
    config = SFTConfig(
        max_steps=steps,
        learning_rate=2e-4,
        **trl_arguments(workdir, batch, max_length, defaults, precision),
    )
    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(str(model)),
        args=config,
        train_dataset=dataset,
        processing_class=AutoTokenizer.from_pretrained(str(model)),
        peft_config=trl_lora(),
    )
    return {"tokens_per_second": timed_tokens_per_second(trainer)}


def trl_arguments(
    workdir: Path, batch: int, max_length: int, defaults: bool, precision: str = "fp32"
) -> dict[str, Any]:
    """The arguments TRL's trainers share here: tunefleet's batch, length, schedule and
    precision (fp32 on CPU; bf16 on a GPU), no saving. TRL's default turns gradient
    checkpointing on; tunefleet's regime (`defaults` False) keeps the activations."""
    regime: dict[str, Any] = {} if defaults else {"gradient_checkpointing": False}
    return {
        "output_dir": str(workdir / "trl"),
        "per_device_train_batch_size": batch,
        "lr_scheduler_type": "cosine",
        "warmup_steps": 0.05,
        "max_length": max_length,
        "logging_steps": 1,
        "report_to": "none",
        "save_strategy": "no",
        "seed": 1,
        "use_cpu": precision == "fp32",
        "dataloader_num_workers": 0,
        "bf16": precision == "bf16",
        "fp16": False,
        **regime,
    }


def trl_lora() -> Any:
    """tunefleet's LoRA shape as PEFT's config: r=16 on all linear layers."""
    from peft import LoraConfig

    return LoraConfig(
        r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM"
    )


def timed_tokens_per_second(trainer: Any) -> float:
    """Train; the non-padding tokens TRL counted per second of `train()`."""
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    tokens = max(entry.get("num_tokens", 0) for entry in trainer.state.log_history)
    return float(tokens) / seconds


def child(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        if args.child in ("trl", "trl-same-memory"):
            result = run_trl(
                args.model,
                args.data,
                args.steps,
                workdir,
                args.max_length,
                args.batch,
                defaults=args.child == "trl",
                precision=args.precision,
            )
        else:
            result = run_tunefleet(
                args.model,
                args.data,
                args.steps,
                args.child,
                workdir,
                args.max_length,
                args.batch,
                args.precision,
            )
    result["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        result["gpu_peak_mib"] = torch.cuda.max_memory_allocated() / 2**20
    args.out.write_text(json.dumps(result))


def spawn(
    name: str,
    model: Path,
    data: Path,
    steps: int,
    max_length: int,
    batch: int,
    out: Path,
    precision: str = "fp32",
) -> dict[str, Any]:
    subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            name,
            "--model",
            str(model),
            "--data",
            str(data),
            "--steps",
            str(steps),
            "--max-length",
            str(max_length),
            "--batch",
            str(batch),
            "--out",
            str(out),
            "--precision",
            precision,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    result: dict[str, Any] = json.loads(out.read_text())
    return result


SIDES = {
    "lora": "tunefleet",
    "trl": "TRL, defaults",
    "trl-same-memory": "TRL, no checkpointing",
}


def compare_with_trl(
    directory: Path,
    model: Path,
    data: Path,
    steps: int,
    max_length: int,
    batch: int,
    rounds: int,
    precision: str = "fp32",
) -> None:
    """tunefleet's LoRA and TRL's SFTTrainer (both regimes) in `rounds` interleaved rounds, in
    a rotating order, every round printed (tokens per second, peak memory: the GPU's when the
    run had one, else the process's RSS); then the median and range of each ratio."""
    ratios: dict[str, list[float]] = {"trl": [], "trl-same-memory": []}

    def run(name: str, number: int | str, run_steps: int) -> dict[str, Any] | None:
        out = directory / f"{name}-{number}.json"
        try:
            result = spawn(name, model, data, run_steps, max_length, batch, out, precision)
        except subprocess.CalledProcessError as error:
            print(f"  round {number} {SIDES[name]:22s}: failed (exit {error.returncode})")
            return None
        memory = result.get("gpu_peak_mib", result["peak_mib"])
        print(
            f"  round {number} {SIDES[name]:22s}: {result['tokens_per_second']:9,.0f} tokens/s, "
            f"peak {memory:8,.0f} MiB ({'GPU' if 'gpu_peak_mib' in result else 'RSS'})",
            flush=True,
        )
        return result

    warm_up(list(SIDES), lambda name: run(name, "warm-up", min(steps, 4)))
    for number, order in rotations(list(SIDES), rounds):
        speed = {}
        for name in order:
            result = run(name, number, steps)
            if result is not None:
                speed[name] = result["tokens_per_second"]
        for name in ratios:
            if "lora" in speed and name in speed:
                ratios[name].append(speed["lora"] / speed[name])
    for name, values in ratios.items():
        if values:
            print(f"  tokens/s, tunefleet / {SIDES[name]}: {spread(values)}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--max-length", type=int, default=512, help=argparse.SUPPRESS)
    parser.add_argument("--batch", type=int, default=8, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    with tempfile.TemporaryDirectory() as scratch:
        directory = Path(scratch)
        small = build_model(directory / "small", SMALL)
        data = build_data(directory / "data.jsonl", 512)
        print(f"model: Llama {SMALL}, data: 512 conversations of 20-230 words", flush=True)
        compare_with_trl(directory, small, data, args.steps, 512, 8, args.rounds)
        larger = build_model(directory / "larger", LARGER)
        lora = spawn("lora", larger, data, 3, 128, 2, directory / "lora.json")
        qlora = spawn("qlora", larger, data, 3, 128, 2, directory / "qlora.json")
        print(f"QLoRA vs LoRA on Llama {LARGER}:")
        print(
            f"  model in memory: {qlora['model_mib']:,.0f} MiB vs {lora['model_mib']:,.0f} MiB, "
            f"ratio {qlora['model_mib'] / lora['model_mib']:.2f}"
        )
        print(
            f"  process peak RSS: {qlora['peak_mib']:,.0f} MiB vs {lora['peak_mib']:,.0f} MiB, "
            f"ratio {qlora['peak_mib'] / lora['peak_mib']:.2f} (on CPU the peak is set while "
            "loading: the fp32 checkpoint is read before bitsandbytes quantises it)"
        )


if __name__ == "__main__":
    main()
