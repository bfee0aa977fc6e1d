"""Gateway benchmark: what the cluster's gateway (nginx with deploy/base/gateway.conf) costs a
client, against calling the same server directly, measured in the same run.

    python benchmarks/gateway.py [--calls 2000] [--records 20000]

One embedded `tunefleet serve` is the upstream of all four routes; the SDK calls it directly and
through Debian's nginx (`apt-get install nginx`) running the gateway's configuration:
1. sequential GetDataset calls: the latency the extra hop adds per call;
2. the same from 8 threads at once: calls per second;
3. a PreviewDatasetRecords stream of a whole dataset: time per streamed message;
4. uploads (a client stream) of a dataset of `--records` records, new content each time.
Each pair is run in alternation for several rounds; medians are reported, with the ratio
gateway / direct.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

# The nginx runner lives with the gateway's tests.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.deploy.nginx import running_gateway
from tunefleet.app.services import SERVICES
from tunefleet.client import Client
from tunefleet.demo.server import LocalServer

ROUNDS = 5
THREADS = 8


def compare(direct: Callable[[int], object], gateway: Callable[[int], object]) -> list[float]:
    """Median seconds of ROUNDS runs of each (given the round's number), alternating so that
    drift hits both alike."""
    times: list[list[float]] = [[], []]
    for round_number in range(ROUNDS):
        for index, function in enumerate((direct, gateway)):
            started = time.perf_counter()
            function(round_number * 2 + index)
            times[index].append(time.perf_counter() - started)
    return [statistics.median(t) for t in times]


def report(label: str, times: list[float], count: int, unit: str) -> None:
    """Microseconds per `unit` (a call, a message, a record), and the ratio."""
    direct, gateway = times
    print(
        f"{label:<34} direct {direct / count * 1e6:9.1f} us/{unit}"
        f"  gateway {gateway / count * 1e6:9.1f} us/{unit}  ratio {gateway / direct:5.2f}"
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

            def gets(client: Client) -> Callable[[int], None]:
                def run(_: int) -> None:
                    for _ in range(calls):
                        client.datasets.get(dataset.name)

                return run

            def parallel_gets(client: Client) -> Callable[[int], None]:
                def run(_: int) -> None:
                    with ThreadPoolExecutor(THREADS) as pool:
                        list(pool.map(lambda _: client.datasets.get(dataset.name), range(calls)))

                return run

            def preview(client: Client) -> Callable[[int], None]:
                def run(_: int) -> None:
                    list(client.datasets.preview(dataset.name, limit=dataset.record_count))

                return run

            def upload(client: Client) -> Callable[[int], None]:
                def run(tag: int) -> None:
                    client.datasets.upload(
                        records(args.records, tag), options={"validationFraction": 0}
                    )

                return run

            report("GetDataset, one at a time", compare(gets(direct), gets(gateway)), calls, "call")
            report(
                f"GetDataset, {THREADS} threads",
                compare(parallel_gets(direct), parallel_gets(gateway)),
                calls,
                "call",
            )
            report(
                "PreviewDatasetRecords stream",
                compare(preview(direct), preview(gateway)),
                dataset.record_count,
                "msg",
            )
            report(
                "UploadDataset stream",
                compare(upload(direct), upload(gateway)),
                args.records,
                "record",
            )


if __name__ == "__main__":
    main()
