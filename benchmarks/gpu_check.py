"""The GPU check: the PEFT engine on a CUDA device, standalone (no services), for sessions lent a
GPU machine. One short run (a few minutes on one H200) printing every figure:

    python benchmarks/gpu_check.py [--device cuda] [--hidden 2048] [--layers 16] [--rounds 2]

1. Exactness, float32: greedy answers of the base model and three LoRA adapters (one DoRA),
   asked for at once (one mixed batch), against plain transformers + PEFT one request at a time
   on the same device; and prompt log-probabilities with the top 5 (what the OpenAI front's
   `echo` + `logprobs` return) against PEFT's own forward pass.
2. Throughput, bfloat16, a random Llama of about 0.9B parameters: 64 requests of 64 tokens,
   16 at a time, for one adapter (`one`), spread over 8 adapters in the running batch
   (`eight`), and one adapter at a time swapped in per request (`swap`, the alternative a
   multi-adapter server replaces), in interleaved rounds; tokens per second and the ratios
   eight/one and eight/swap.
It needs torch with CUDA, transformers and peft (the versions found are printed).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
for folder in ("gen/python", "services", "clients"):
    sys.path.insert(0, str(ROOT / folder))

from tunefleet.demo.models import build_chat_model  # noqa: E402
from tunefleet.inference.engine import AdapterFiles, GenerationRequest, Sampling  # noqa: E402
from tunefleet.inference.peft_engine import PeftEngine  # noqa: E402

PROMPTS = [
    "<|user|>Which colour goes with the cat?<|end|><|assistant|>",
    "<|system|>Answer with one colour.<|end|><|user|>And the owl?<|end|><|assistant|>",
    "<|user|>Name a colour for the fox, please.<|end|><|assistant|>",
    "<|system|>You know animals and colours well.<|end|><|user|>What goes with the bee?<|end|>"
    "<|assistant|>",
]
CORPUS = PROMPTS + [f"Colour: {c}. Done." for c in ("red", "blue", "grey", "green", "white")]


def model(directory: Path, hidden: int, layers: int, heads: int, dtype: str) -> Path:
    """The tiny tokenizer and chat template, with a Llama of the given size, random weights."""
    import torch
    from transformers import AutoConfig, LlamaForCausalLM

    build_chat_model(directory, CORPUS, max_positions=2048)
    config = AutoConfig.from_pretrained(directory)
    config.hidden_size, config.num_hidden_layers = hidden, layers
    config.num_attention_heads = config.num_key_value_heads = heads
    config.intermediate_size = hidden * 11 // 4
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(getattr(torch, dtype)).save_pretrained(directory)
    return directory


def adapter(base: Path, directory: Path, seed: int, **options: Any) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    options.setdefault("target_modules", ["q_proj", "k_proj", "v_proj", "o_proj"])
    peft_model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(base),
        LoraConfig(r=16, lora_alpha=32, init_lora_weights=False, **options),
    )
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if "lora_" in name:
                parameter.mul_(4.0)
    peft_model.save_pretrained(str(directory))
    return directory


def files(name: str, path: Path) -> AdapterFiles:
    return AdapterFiles(name, path, json.loads((path / "adapter_config.json").read_text()))


DEVICE = "cuda"


async def answer(engine: PeftEngine, ids: list[int], adapter: str | None, tokens: int) -> list[int]:
    out: list[int] = []
    async for piece in engine.generate(
        GenerationRequest(ids, adapter, Sampling(max_tokens=tokens))
    ):
        out.extend(piece.token_ids)
    return out


def reference(base: Path, path: Path | None, ids: list[int], tokens: int) -> tuple[list[int], Any]:
    """Plain PEFT's greedy tokens and log-softmax over the prompt, one request, float32."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    loaded: Any = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    model: Any = loaded.to(DEVICE)
    if path is not None:
        model = PeftModel.from_pretrained(model, path).to(DEVICE)
    model.eval()
    tensor = torch.tensor([ids], device=DEVICE)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(input_ids=tensor).logits[0].float(), -1)
        out = model.generate(
            input_ids=tensor,
            attention_mask=torch.ones_like(tensor),
            max_new_tokens=tokens,
            do_sample=False,
        )
    generated = out[0, len(ids) :].tolist()
    eos = model.config.eos_token_id
    if eos in generated:
        generated = generated[: generated.index(eos)]
    return generated, logprobs


async def exactness(root: Path) -> None:
    base = model(root / "small", hidden=256, layers=4, heads=4, dtype="float32")
    paths = {
        "a": adapter(base, root / "a", 1),
        "b": adapter(base, root / "b", 2, target_modules=["gate_proj", "up_proj", "down_proj"]),
        "dora": adapter(base, root / "dora", 3, use_dora=True),
    }
    engine = PeftEngine(base, device=DEVICE, dtype="float32", max_batch=16)
    await engine.start()
    for adapter_name, path in paths.items():
        await engine.load_adapter(files(adapter_name, path))
    names: list[str | None] = [None, *paths]
    cases = [(name, prompt) for name in names for prompt in PROMPTS]
    ids = {p: engine.tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS}
    found = await asyncio.gather(*(answer(engine, ids[p], n, 24) for n, p in cases))
    equal, worst, top_equal = 0, 0.0, 0
    for (name, prompt), tokens in zip(cases, found, strict=True):
        expected, logprobs = reference(base, paths.get(name or ""), ids[prompt], 24)
        equal += tokens == expected
        scores = await engine.score(ids[prompt], 1, name, 5)
        for position, score in enumerate(scores, start=1):
            row = logprobs[position - 1]
            worst = max(worst, abs(score.logprob - float(row[ids[prompt][position]])))
            top_equal += [t for t, _ in score.top] == row.topk(5).indices.tolist()
    positions = sum(len(ids[p]) - 1 for _, p in cases)
    print(
        f"exactness (float32, {DEVICE}): {equal}/{len(cases)} greedy answers equal plain PEFT "
        f"(base, LoRA attention, LoRA MLP, DoRA; one mixed batch)"
    )
    print(
        f"  prompt log-probabilities: max |difference| {worst:.2e} over {positions} tokens; "
        f"top-5 ids equal at {top_equal}/{positions} places"
    )
    await engine.close()


async def throughput(root: Path, hidden: int, layers: int, rounds: int) -> None:
    base = model(root / "big", hidden=hidden, layers=layers, heads=hidden // 128, dtype="bfloat16")
    paths = [adapter(base, root / f"l{i}", 10 + i) for i in range(8)]
    engine = PeftEngine(base, device=DEVICE, dtype="bfloat16", max_batch=16)
    await engine.start()
    ids = [engine.tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]
    requests = [(ids[i % len(ids)], i % 8) for i in range(64)]
    semaphore = asyncio.Semaphore(16)

    async def limited(prompt: list[int], name: str) -> int:
        async with semaphore:
            return len(await answer(engine, prompt, name, 64))

    async def one() -> int:
        return sum(await asyncio.gather(*(limited(p, "l0") for p, _ in requests)))

    async def eight() -> int:
        return sum(await asyncio.gather(*(limited(p, f"l{k}") for p, k in requests)))

    async def swap() -> int:
        await engine.unload_adapter("l0")  # holding one adapter at a time
        loaded, total = None, 0
        for prompt, k in requests:
            if loaded != k:
                if loaded is not None:
                    await engine.unload_adapter(f"l{loaded}")
                await engine.load_adapter(files(f"l{k}", paths[k]))
                loaded = k
            total += len(await answer(engine, prompt, f"l{k}", 64))
        await engine.unload_adapter(f"l{loaded}")
        await engine.load_adapter(files("l0", paths[0]))
        return total

    await engine.load_adapter(files("l0", paths[0]))
    await one()  # warm-up
    rates: dict[str, list[float]] = {"one": [], "eight": [], "swap": []}
    for round_number in range(rounds):
        for load in ("one", "swap") if round_number % 2 else ("swap", "one"):
            rates[load].append(await timed(load, one if load == "one" else swap))
        for k in range(1, 8):
            await engine.load_adapter(files(f"l{k}", paths[k]))
        rates["eight"].append(await timed("eight", eight))
        for k in range(1, 8):
            await engine.unload_adapter(f"l{k}")
    median = {load: statistics.median(values) for load, values in rates.items()}
    print(
        f"throughput (bfloat16, {DEVICE}, {engine.model.num_parameters() / 1e9:.2f}B parameters, "
        f"64 requests x 64 tokens, 16 at a time), medians of {rounds} rounds: "
        + ", ".join(f"{load} {rate:.0f} tokens/s" for load, rate in median.items())
    )
    print(
        f"  eight/one {median['eight'] / median['one']:.2f}, "
        f"eight/swap {median['eight'] / median['swap']:.2f}"
    )
    await engine.close()


async def timed(label: str, run: Any) -> float:
    import torch

    if DEVICE == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    tokens: int = await run()
    seconds = time.perf_counter() - started
    print(
        f"  {label:5s}: {tokens} tokens in {seconds:6.2f} s = {tokens / seconds:8.1f} tokens/s",
        flush=True,
    )
    return tokens / seconds


async def main() -> None:
    import argparse

    import peft
    import torch
    import transformers

    global DEVICE
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    DEVICE = args.device
    name = torch.cuda.get_device_name() if DEVICE == "cuda" else DEVICE
    print(
        f"torch {torch.__version__}, transformers {transformers.__version__}, "
        f"peft {peft.__version__}, {name}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as directory:
        await exactness(Path(directory))
        await throughput(Path(directory), args.hidden, args.layers, args.rounds)


if __name__ == "__main__":
    asyncio.run(main())
