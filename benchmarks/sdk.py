"""SDK benchmark: what the typed facade costs over the generated stubs, sync and async, measured
against the same embedded server in the same run.

    python benchmarks/sdk.py [--calls 2000] [--pages 60]

1. Sequential GetDataset calls: a raw `DatasetServiceStub` against `Client.datasets.get`, and a
   raw `grpc.aio` stub against `AsyncClient.datasets.get` (the SDK adds name handling, deadline,
   metadata, the generator step and error translation).
2. A server stream: every record of a dataset through PreviewDatasetRecords, raw against
   `datasets.preview`, sync and async.
3. Paging: ListDatasets page by page by hand against iterating `datasets.list`.
4. GetDataset against a server in this process that answers at once: the facade's own cost,
   which the real server's few milliseconds per call hide in 1.-3.
Each comparison runs both sides once untimed, then 5 rounds in a rotating order, every round
printed (benchmarks/harness.py); the ratio sdk / raw is printed as its median and range.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.harness import spread, time_rounds, time_rounds_async  # noqa: E402
from tunefleet.client import AsyncClient, Client  # noqa: E402
from tunefleet.demo import task  # noqa: E402
from tunefleet.demo.server import LocalServer  # noqa: E402
from tunefleet.v1 import dataset_pb2, dataset_service_pb2, dataset_service_pb2_grpc  # noqa: E402

ROUNDS = 5


def compare(
    label: str, raw: Callable[[], object], sdk: Callable[[], object], unit: str, count: int
) -> None:
    report(label, time_rounds({"raw": raw, "sdk": sdk}, ROUNDS, label), unit, count)


async def compare_async(
    label: str,
    raw: Callable[[], Awaitable[object]],
    sdk: Callable[[], Awaitable[object]],
    unit: str,
    count: int,
) -> None:
    report(label, await time_rounds_async({"raw": raw, "sdk": sdk}, ROUNDS, label), unit, count)


def report(label: str, times: dict[str, list[float]], unit: str, count: int) -> None:
    """Median time per unit of each, and the ratio sdk / raw of each round as median and range."""
    raw, sdk = (statistics.median(times[side]) / count * 1e6 for side in ("raw", "sdk"))
    ratios = [s / r for r, s in zip(times["raw"], times["sdk"], strict=True)]
    print(f"{label:<38} raw {raw:8.1f} {unit}  sdk {sdk:8.1f} {unit}  sdk / raw {spread(ratios)}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--pages", type=int, default=60, help="datasets to list, one per page")
    args = parser.parse_args()
    calls = args.calls

    with LocalServer(Path(tempfile.mkdtemp(prefix="tunefleet-bench-sdk-"))) as server:
        client = Client(server.target)
        dataset = client.datasets.upload(task.sample(), options={"validationFraction": 0.2})
        for index in range(args.pages):  # small datasets to page through
            record = json.dumps({"prompt": f"q{index}", "completion": "a"}).encode()
            client.datasets.upload(record + b"\n", options={"validationFraction": 0})
        records = dataset.record_count
        print(
            f"server {server.target}; {calls} calls, {records} records per stream, {ROUNDS} rounds"
        )

        channel = grpc.insecure_channel(server.target)
        stub = dataset_service_pb2_grpc.DatasetServiceStub(channel)
        get = dataset_service_pb2.GetDatasetRequest(name=dataset.name)
        preview = dataset_service_pb2.PreviewDatasetRecordsRequest(name=dataset.name, limit=records)

        def raw_gets() -> None:
            for _ in range(calls):
                stub.GetDataset(get, timeout=30)

        def sdk_gets() -> None:
            for _ in range(calls):
                client.datasets.get(dataset.name)

        def raw_pages() -> int:
            token, count = "", 0
            while True:
                page = stub.ListDatasets(
                    dataset_service_pb2.ListDatasetsRequest(page_size=1, page_token=token),
                    timeout=30,
                )
                count += len(page.datasets)
                token = page.next_page_token
                if not token:
                    return count

        compare("GetDataset, sync", raw_gets, sdk_gets, "us/call", calls)
        compare(
            "PreviewDatasetRecords stream, sync",
            lambda: list(stub.PreviewDatasetRecords(preview)),
            lambda: list(client.datasets.preview(dataset.name, limit=records)),
            "us/msg",
            records,
        )
        pages = raw_pages()
        compare(
            "ListDatasets pages of 1, sync",
            raw_pages,
            lambda: list(client.datasets.list(page_size=1)),
            "us/page",
            pages,
        )
        channel.close()
        client.close()

        asyncio.run(measure_async(server.target, dataset.name, calls, records))
    no_op_server(calls)


async def measure_async(target: str, name: str, calls: int, records: int) -> None:
    channel = grpc.aio.insecure_channel(target)
    stub = dataset_service_pb2_grpc.DatasetServiceStub(channel)
    client = AsyncClient(target)
    get = dataset_service_pb2.GetDatasetRequest(name=name)
    preview = dataset_service_pb2.PreviewDatasetRecordsRequest(name=name, limit=records)

    async def raw_gets() -> None:
        for _ in range(calls):
            await stub.GetDataset(get, timeout=30)

    async def sdk_gets() -> None:
        for _ in range(calls):
            await client.datasets.get(name)

    async def raw_stream() -> None:
        async for _ in stub.PreviewDatasetRecords(preview):
            pass

    async def sdk_stream() -> None:
        async for _ in client.datasets.preview(name, limit=records):
            pass

    await compare_async("GetDataset, async", raw_gets, sdk_gets, "us/call", calls)
    await compare_async(
        "PreviewDatasetRecords stream, async", raw_stream, sdk_stream, "us/msg", records
    )
    await client.close()
    await channel.close()


class Echo(dataset_service_pb2_grpc.DatasetServiceServicer):
    def GetDataset(self, request: Any, context: grpc.ServicerContext) -> dataset_pb2.Dataset:
        return dataset_pb2.Dataset(name=request.name)


def no_op_server(calls: int) -> None:
    """The facade's own cost, against a server that answers at once (in this process)."""
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    echo = Echo()  # type: ignore[abstract]  # only GetDataset is called
    dataset_service_pb2_grpc.add_DatasetServiceServicer_to_server(echo, server)
    target = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    with grpc.insecure_channel(target) as channel, Client(target) as client:
        stub = dataset_service_pb2_grpc.DatasetServiceStub(channel)
        get = dataset_service_pb2.GetDatasetRequest(name="datasets/d")
        compare(
            "GetDataset, no-op server, sync",
            lambda: [stub.GetDataset(get, timeout=30) for _ in range(calls)],
            lambda: [client.datasets.get("datasets/d") for _ in range(calls)],
            "us/call",
            calls,
        )
    server.stop(0)


if __name__ == "__main__":
    main()
