"""Gateway benchmark: what the cluster's gateway (nginx with deploy/base/gateway.conf) costs a
client, against calling the same server directly, measured in the same run.

    python benchmarks/gateway.py [--calls 2000] [--records 20000]

One embedded `tunefleet serve` is the upstream of all four routes; the SDK calls it directly and
through Debian's nginx (`apt-get install nginx`) running the gateway's configuration:
1. sequential GetDataset calls: the latency the extra hop adds per call;
2. the same from 8 threads at once: calls per second;
3. a PreviewDatasetRecords stream of a whole dataset: time per streamed message;
4. uploads (a client stream) of a dataset of `--records` records, new content each time.
Each pair runs once untimed, then 5 rounds in a rotating order, every round printed
(benchmarks/harness.py); medians are reported, with the ratio gateway / direct of each round as
its median and range.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# The nginx runner lives with the gateway's tests; the harness with the benchmarks.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.harness import spread, time_rounds
from tests.deploy.nginx import running_gateway
from tunefleet.app.services import SERVICES
from tunefleet.client import Client
from tunefleet.demo.server import LocalServer

ROUNDS = 5
THREADS = 8


def compare(
    label: str, direct: Callable[[], object], gateway: Callable[[], object], count: int, unit: str
) -> None:
    """Time both in rounds; print the median microseconds per `unit` (a call, a message, a
    record) of each, and the ratio gateway / direct of each round as its median and range."""
    times = time_rounds({"direct": direct, "gateway": gateway}, ROUNDS, label)
    ratios = [g / d for d, g in zip(times["direct"], times["gateway"], strict=True)]
    direct_us, gateway_us = (
        statistics.median(times[side]) / count * 1e6 for side in ("direct", "gateway")
    )
    print(
        f"{label:<34} direct {direct_us:9.1f} us/{unit}  gateway {gateway_us:9.1f} us/{unit}"
        f"  gateway / direct {spread(ratios)}"
    )


def records(count: int, tag: int) -> bytes:
    lines = (
        json.dumps({"prompt": f"question {tag}-{i}: what is {i} + {tag}?", "completion": str(i)})
        for i in range(count)
    )
    return ("\n".join(lines) + "\n").encode()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--records", type=int, default=20000)
    args = parser.parse_args()
    calls = args.calls

    work = Path(tempfile.mkdtemp(prefix="tunefleet-bench-gateway-"))
    with LocalServer(work / "data") as server:
        routes = dict.fromkeys(SERVICES, server.target)
        with (
            running_gateway(work / "nginx", routes) as address,
            Client(server.target) as direct,
            Client(address) as gateway,
        ):
            dataset = direct.datasets.upload(records(2000, -1), options={"validationFraction": 0})
            print(
                f"server {server.target}, gateway {address}; {calls} calls, "
                f"{dataset.record_count} records per stream, {args.records} per upload, "
                f"{ROUNDS} rounds"
            )

            def gets(client: Client) -> Callable[[], None]:
                def run() -> None:
                    for _ in range(calls):
                        client.datasets.get(dataset.name)

                return run

            def parallel_gets(client: Client) -> Callable[[], None]:
                def run() -> None:
                    with ThreadPoolExecutor(THREADS) as pool:
                        list(pool.map(lambda _: client.datasets.get(dataset.name), range(calls)))

                return run

            def preview(client: Client) -> Callable[[], None]:
                def run() -> None:
                    list(client.datasets.preview(dataset.name, limit=dataset.record_count))

                return run

            tags = itertools.count()  # new content for every upload

            def upload(client: Client) -> Callable[[], None]:
                def run() -> None:
                    client.datasets.upload(
                        records(args.records, next(tags)), options={"validationFraction": 0}
                    )

                return run

            compare("GetDataset, one at a time", gets(direct), gets(gateway), calls, "call")
            compare(
                f"GetDataset, {THREADS} threads",
                parallel_gets(direct),
                parallel_gets(gateway),
                calls,
                "call",
            )
            compare(
                "PreviewDatasetRecords stream",
                preview(direct),
                preview(gateway),
                dataset.record_count,
                "msg",
            )
            compare("UploadDataset stream", upload(direct), upload(gateway), args.records, "record")


if __name__ == "__main__":
    main()
