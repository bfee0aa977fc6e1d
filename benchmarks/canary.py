"""What a canary costs in serving: requests for an alias split 90/10 between two versions (a
canary: the engine batches two adapters together, and each request is drawn) against the same
requests for an alias without a canary (one version), on one embedded `tunefleet serve`, in the
same run.

    python benchmarks/canary.py [--model smollm2|tiny] [--rounds 3] [--requests 8] [--tokens 16]

Both aliases point at the same first version; `prod` has a canary of `--percent` to `candidate`
(a second version), `plain` has none. Every round sends, from 16 concurrent clients, `--requests`
greedy chats each with a distinct routing key to `plain` and to `prod`, back to back in
a rotating order (benchmarks/harness.py), after a warm-up of both, and prints generated tokens per
second, p50 latency and the share of `prod`'s requests the candidate answered; the summary is each
ratio canary / plain over the rounds, as its median and range (throughput: 1.00 means the split
costs nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import rotations, spread  # noqa: E402
from tunefleet.client import AsyncClient  # noqa: E402
from tunefleet.demo import models, task  # noqa: E402
from tunefleet.demo.server import LocalServer  # noqa: E402

CLIENTS = 16


def lora(model: Path, directory: Path, seed: int) -> Path:
    """A random LoRA adapter of `model` (weights that change its output)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model)
    config = LoraConfig(r=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(base, config).save_pretrained(str(directory))
    return directory


async def run(
    client: AsyncClient, alias: str, requests: int, tokens: int, round_number: int
) -> tuple[int, float, list[float], dict[str, int]]:
    """Generated tokens, wall seconds, latencies and the versions that answered, for one side."""
    questions = task.questions()
    latencies: list[float] = []
    versions: dict[str, int] = {}
    generated = 0

    async def caller(index: int) -> None:
        nonlocal generated
        for n in range(requests):
            question = questions[(index * requests + n) % len(questions)]
            started = time.perf_counter()
            reply = await client.inference.generate(
                messages=[{"role": "user", "content": question}],
                adapter=f"adapters/bench@{alias}",
                max_tokens=tokens,
                routing_key=f"user-{round_number}-{index}-{n}",
            )
            latencies.append(time.perf_counter() - started)
            generated += reply.usage.completion_tokens
            versions[reply.adapter_version] = versions.get(reply.adapter_version, 0) + 1

    started = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(CLIENTS)))
    return generated, time.perf_counter() - started, latencies, versions


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=8, help="per client and round")
    parser.add_argument("--tokens", type=int, default=16, help="max_tokens of each request")
    parser.add_argument("--percent", type=int, default=10, help="the canary's share")
    args = parser.parse_args()

    cache = models.cache_dir()
    if args.model == "smollm2":
        name, path = models.SMOLLM2, models.smollm2(cache)
    else:
        name, path = models.TINY, models.tiny(cache, task.corpus(), task.questions())
    settings = {
        "models": {name: str(path)},
        "logging": {"level": "WARNING"},
        "inference": {"base_model": name, "max_batch": CLIENTS},
    }
    with tempfile.TemporaryDirectory() as data:
        first, second = lora(path, Path(data) / "v1", 1), lora(path, Path(data) / "v2", 2)
        server = LocalServer(Path(data) / "server", settings).start(timeout=300)
        client = AsyncClient(server.target)
        summary: dict[str, list[tuple[float, float]]] = {"plain": [], "prod": []}
        try:
            await client.adapters.create("bench", base_model=name)
            v1 = await client.adapters.upload_version("bench", first)
            v2 = await client.adapters.upload_version("bench", second)
            for alias, version in (("plain", v1), ("prod", v1), ("candidate", v2)):
                await client.adapters.set_alias("bench", alias, version.name)
            await client.adapters.set_canary("bench", "prod", "candidate", args.percent)
            for alias in ("plain", "prod"):  # warm-up: both versions loaded, both aliases routed
                await run(client, alias, 2, args.tokens, -1)
            for round_number, order in rotations(["plain", "prod"], args.rounds):
                for alias in order:
                    generated, seconds, latencies, versions = await run(
                        client, alias, args.requests, args.tokens, round_number
                    )
                    p50 = statistics.median(latencies)
                    summary[alias].append((generated / seconds, p50))
                    share = versions.get(v2.name, 0) / max(1, sum(versions.values()))
                    print(
                        f"round {round_number} {alias:5s}: {generated:5d} tokens in "
                        f"{seconds:6.2f} s = {generated / seconds:7.1f} tokens/s, "
                        f"p50 {p50 * 1000:7.1f} ms, answered by the candidate {share:.0%}",
                        flush=True,
                    )
        finally:
            await client.close()
            server.stop()
    pairs = list(zip(summary["plain"], summary["prod"], strict=True))
    print(
        f"\nover {args.rounds} rounds ({name}, {CLIENTS} clients, max_tokens {args.tokens}, "
        f"canary {args.percent}%): throughput canary / plain "
        f"{spread([prod[0] / plain[0] for plain, prod in pairs])}, p50 latency canary / plain "
        f"{spread([prod[1] / plain[1] for plain, prod in pairs])}"
    )


if __name__ == "__main__":
    asyncio.run(main())
