"""The OpenAI front's cost: chat completions through the HTTP front (the openai client against
`/v1/chat/completions`) against the same requests over gRPC (the SDK's AsyncClient against
InferenceService), on one embedded `tunefleet serve`, in the same run.

    python benchmarks/openai_front.py [--model smollm2|tiny] [--rounds 3] [--tokens 32]

For 1 and 16 concurrent clients, each sending `--requests` greedy chats one after another (the
same prompts, so the same tokens, on both sides), every round runs both sides back to back in
a rotating order (benchmarks/harness.py), after a warm-up request each way, and prints generated
tokens per second and p50/p99 latency; the summary is each ratio HTTP / gRPC over the rounds, as
its median and range (throughput: 1.00 means the front costs nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import openai

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import rotations, spread  # noqa: E402
from tunefleet.client import AsyncClient  # noqa: E402
from tunefleet.demo import models, task  # noqa: E402
from tunefleet.demo.server import LocalServer  # noqa: E402

SYSTEM = "Extract the order as JSON."


def prompts(count: int) -> list[str]:
    questions = task.questions()
    return [questions[i % len(questions)] for i in range(count)]


async def run(
    side: str, client: Any, model: str, clients: int, requests: int, tokens: int
) -> tuple[int, float, list[float]]:
    """Generated tokens, wall seconds and each request's latency for one side, its `client`
    (an AsyncClient or an AsyncOpenAI) shared by the concurrent callers as one connection
    pool."""
    texts = prompts(clients * requests)
    latencies: list[float] = []
    generated = 0

    async def send(messages: list[dict[str, str]]) -> int:
        """One chat; the tokens generated."""
        if side == "grpc":
            reply = await client.inference.generate(messages=messages, max_tokens=tokens)
        else:
            reply = await client.chat.completions.create(
                model=model, messages=messages, max_tokens=tokens, temperature=0
            )
        return int(reply.usage.completion_tokens)

    async def caller(index: int) -> None:
        nonlocal generated
        for n in range(requests):
            messages = [
                {"role": "system", "content": SYSTEM},
                {"role": "user", "content": texts[index * requests + n]},
            ]
            started = time.perf_counter()
            generated += await send(messages)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(clients)))
    return generated, time.perf_counter() - started, latencies


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=4, help="per client and round")
    parser.add_argument("--tokens", type=int, default=32, help="max_tokens of each request")
    args = parser.parse_args()

    cache = models.cache_dir()
    if args.model == "smollm2":
        name, path = models.SMOLLM2, models.smollm2(cache)
    else:
        name, path = models.TINY, models.tiny(cache, task.corpus(), task.questions())
    settings = {
        "models": {name: str(path)},
        "logging": {"level": "WARNING"},
        "inference": {"base_model": name, "max_batch": 16},
    }
    with tempfile.TemporaryDirectory() as data:
        server = LocalServer(Path(data), settings).start(timeout=300)
        grpc_client = AsyncClient(server.target)
        http_client = openai.AsyncOpenAI(
            base_url=f"http://127.0.0.1:{server.openai_port}/v1", api_key="unused", max_retries=0
        )
        sides: dict[str, Any] = {"grpc": grpc_client, "http": http_client}
        try:
            # A warm-up request each way: connections open, the model's kernels load.
            for side, client in sides.items():
                await run(side, client, name, 1, 1, args.tokens)
            summary: dict[tuple[int, str], list[tuple[float, float, float]]] = {}
            for round_number, order in rotations(["grpc", "http"], args.rounds):
                for clients in (1, 16):
                    for side in order:
                        generated, seconds, latencies = await run(
                            side, sides[side], name, clients, args.requests, args.tokens
                        )
                        row = (
                            generated / seconds,
                            percentile(latencies, 0.5),
                            percentile(latencies, 0.99),
                        )
                        summary.setdefault((clients, side), []).append(row)
                        print(
                            f"round {round_number} clients {clients:2d} {side:4s}: "
                            f"{generated:5d} tokens in {seconds:6.2f} s = {row[0]:7.1f} tokens/s, "
                            f"p50 {row[1] * 1000:7.1f} ms, p99 {row[2] * 1000:7.1f} ms",
                            flush=True,
                        )
        finally:
            await grpc_client.close()
            await http_client.close()
            server.stop()
    print(f"\nover {args.rounds} rounds ({name}, max_tokens {args.tokens}):")
    for clients in (1, 16):
        pairs = list(zip(summary[(clients, "grpc")], summary[(clients, "http")], strict=True))
        g_tps, g_p50 = (statistics.median(g[i] for g, _ in pairs) for i in (0, 1))
        h_tps, h_p50 = (statistics.median(h[i] for _, h in pairs) for i in (0, 1))
        print(
            f"  {clients:2d} clients: gRPC {g_tps:7.1f} tokens/s p50 {g_p50 * 1000:7.1f} ms | "
            f"HTTP {h_tps:7.1f} tokens/s p50 {h_p50 * 1000:7.1f} ms (medians) | throughput "
            f"HTTP / gRPC {spread([h[0] / g[0] for g, h in pairs])}, p50 HTTP / gRPC "
            f"{spread([h[1] / g[1] for g, h in pairs])}"
        )


if __name__ == "__main__":
    asyncio.run(main())
