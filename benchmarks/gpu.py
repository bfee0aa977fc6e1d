"""The GPU check of training, for sessions lent a GPU machine (a few minutes on one H200), and
its dry run on CPU, which CI runs so that the script does not rot:

    make gpu-check                          # python benchmarks/gpu.py
    python benchmarks/gpu.py --dry-run      # CPU, a tiny model, two steps: the same code paths

A randomly initialised model of Llama-3-8B's shape (hidden 4096, 32 layers, 32 heads of which 8
for keys and values, MLP 14336, vocabulary 128256: the compute and memory of the real one, with
no download) is written once in bfloat16, then trained for `--steps` steps by each method, each
in a process of its own, loaded by tunefleet's trainer code (`tunefleet.trainer.model.
load_model`: QLoRA in 4-bit NF4, LoRA and full fine-tuning in bfloat16; LoRA r=16 on every
linear layer, AdamW), on micro-batches of `--batch` x `--length` random tokens. It prints each
method's median step time after a warm-up step, the tokens per second, and
torch.cuda.max_memory_allocated (the process's peak RSS in the dry run).

It needs torch with CUDA and the `train` extra's packages (transformers, peft, pydantic, and
bitsandbytes for QLoRA); a method whose child process fails is printed as failed, with its error.

Then LoRA on a model of SmolLM2-135M's shape (random weights, a small tokenizer, the real
output-layer width) against TRL's SFTTrainer with PEFT, with benchmarks/train.py's runs (same
data, LoRA r=16 on all linear layers, schedule, micro-batch and length; bf16 on the GPU; TRL
with its defaults and in tunefleet's memory regime, gradient checkpointing off), in `--rounds`
interleaved rounds: tokens per second, peak GPU memory and the ratio. It needs TRL (and
`datasets`); without it that section says so. `--sections methods,trl` picks what runs.

Not here: vLLM serving 1 against 8 adapters on the GPU (the GPU machine has no vLLM build of
its own; `make bench-serving` measures it on CPU), and `benchmarks/gpu_check.py` measures the
PEFT engine's serving on a GPU.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for folder in ("gen/python", "services", "clients"):
    sys.path.insert(0, str(ROOT / folder))

LLAMA_3_8B = {
    "hidden_size": 4096,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "intermediate_size": 14336,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
}
TINY = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 128,
    "vocab_size": 256,
    "max_position_embeddings": 256,
}
METHODS = ("qlora", "lora", "full")
# SmolLM2-135M's shape (HuggingFaceTB/SmolLM2-135M's config.json).
SMOLLM2 = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "rope_theta": 100000.0,
    "tie_word_embeddings": True,
}
SMOLLM2_VOCABULARY = 49152
SECTIONS = ("methods", "trl")


def write_model(directory: Path, shape: dict[str, Any], dtype: str) -> Path:
    """A random Llama of `shape`, initialised on the GPU when there is one (fast), saved."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(getattr(torch, dtype))
    model.save_pretrained(directory)
    del model
    return directory


def train(
    model: Path, method: str, steps: int, batch: int, length: int, dtype: str
) -> dict[str, Any]:
    """In the child process: `steps` optimizer steps of `method`; step seconds and memory."""
    import torch

    from tunefleet.trainer.model import load_model
    from tunefleet.trainer.spec import parse_spec

    cuda = torch.cuda.is_available()
    spec = parse_spec(
        {
            "base_model": str(model),
            "method": method,
            "lora": {"rank": 16, "dropout": 0.0, "target_modules": "all-linear"},
            "hyperparameters": {"precision": "bf16" if dtype == "bfloat16" else "fp32"},
            "train_data": {"uri": str(model / "config.json")},  # not read here
            "output_dir": str(model.parent / f"out-{method}"),
        }
    )
    device = "cuda" if cuda else "cpu"
    network = load_model(spec, device)
    network.train()
    parameters = [p for p in network.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(parameters, lr=1e-5)
    vocabulary = network.config.vocab_size
    generator = torch.Generator().manual_seed(0)
    times, tokens = [], batch * length
    for _ in range(steps + 1):  # the first is a warm-up
        ids = torch.randint(0, vocabulary, (batch, length), generator=generator).to(device)
        if cuda:
            torch.cuda.synchronize()
        started = time.perf_counter()
        loss = network(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    if cuda:
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    step = statistics.median(times[1:])
    return {
        "method": method,
        "trainable": sum(p.numel() for p in parameters),
        "step_seconds": step,
        "tokens_per_second": tokens / step,
        "peak_bytes": peak,
        "loss": float(loss.detach()),
        "device": torch.cuda.get_device_name() if cuda else "cpu",
    }


def against_trl(directory: Path, dry_run: bool, rounds: int) -> None:
    """tunefleet's LoRA against TRL's SFTTrainer on a SmolLM2-shaped model, rounds interleaved."""
    import importlib.util

    loaded = importlib.util.spec_from_file_location("runs", ROOT / "benchmarks" / "train.py")
    assert loaded is not None and loaded.loader is not None
    runs = importlib.util.module_from_spec(loaded)  # benchmarks/train.py's runs
    loaded.loader.exec_module(runs)

    missing = [m for m in ("trl", "datasets") if importlib.util.find_spec(m) is None]
    if missing:
        print(f"tunefleet vs TRL: skipped, {' and '.join(missing)} not installed", flush=True)
        return
    shape: dict[str, Any] = SMOLLM2
    if dry_run:
        shape = {
            k: v for k, v in TINY.items() if k not in ("vocab_size", "max_position_embeddings")
        }
    model = runs.build_model(directory / "smollm2", shape, 0 if dry_run else SMOLLM2_VOCABULARY)
    data = runs.build_data(directory / "data.jsonl", 64 if dry_run else 512)
    steps, length, batch = (2, 128, 2) if dry_run else (30, 512, 8)
    precision = "fp32" if dry_run else "bf16"
    named = "a tiny Llama" if dry_run else "SmolLM2-135M"
    print(
        f"tunefleet vs TRL SFTTrainer: LoRA r=16 on {named}"
        f"'s shape, {steps} steps of {batch} x up to {length} tokens, {precision}"
        + (" (dry run: the code paths only; no figure here means anything)" if dry_run else ""),
        flush=True,
    )
    runs.compare_with_trl(directory, model, data, steps, length, batch, rounds, precision)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, a tiny model, two steps")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=1024)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--sections", default=",".join(SECTIONS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    dtype = "float32" if args.dry_run else "bfloat16"
    if args.dry_run:
        args.steps, args.batch, args.length = 2, 2, 32
    if args.child:
        result = train(args.model, args.child, args.steps, args.batch, args.length, dtype)
        print("RESULT " + json.dumps(result), flush=True)
        return
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run it on a GPU machine, or with --dry-run")
    shape = TINY if args.dry_run else LLAMA_3_8B
    sections = args.sections.split(",")
    with tempfile.TemporaryDirectory() as scratch:
        if "trl" in sections:
            against_trl(Path(scratch), args.dry_run, 1 if args.dry_run else args.rounds)
        if "methods" not in sections:
            return
        started = time.perf_counter()
        model = write_model(Path(scratch) / "model", shape, dtype)
        print(
            f"random Llama, hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
            f"vocabulary {shape['vocab_size']}, {dtype}, written in "
            f"{time.perf_counter() - started:.0f} s; micro-batch {args.batch} x {args.length} "
            f"tokens, median of {args.steps} steps after one warm-up",
            flush=True,
        )
        for method in args.methods.split(","):
            command = [sys.executable, __file__, "--child", method, "--model", str(model)]
            if args.dry_run:
                command.append("--dry-run")
            else:
                command += ["--steps", str(args.steps), "--batch", str(args.batch)]
                command += ["--length", str(args.length)]
            child = subprocess.run(command, capture_output=True, text=True, check=False)
            lines = [line for line in child.stdout.splitlines() if line.startswith("RESULT ")]
            if child.returncode != 0 or not lines:
                print(f"  {method:5s}: failed (exit {child.returncode}): {child.stderr[-2000:]}")
                continue
            result = json.loads(lines[-1].removeprefix("RESULT "))
            print(
                f"  {method:5s}: {result['step_seconds'] * 1000:8.1f} ms a step, "
                f"{result['tokens_per_second']:9.0f} tokens/s, peak "
                f"{result['peak_bytes'] / 2**30:6.2f} GiB, "
                f"{result['trainable']:,} trainable parameters, loss {result['loss']:.3f} "
                f"({result['device']})",
                flush=True,
            )


if __name__ == "__main__":
    main()
