"""Faults of the environment, on real `tunefleet serve` processes: a full disk (a small tmpfs),
a SQLite file another process holds locked, a read-only data folder, uploads killed mid-way.
Each ends in its own status (RESOURCE_EXHAUSTED, UNAVAILABLE), never INTERNAL, or in a clear
refusal to start; nothing is left behind."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.helpers import error_info
from tunefleet.demo.server import LocalServer
from tunefleet.storage.spools import OWNER
from tunefleet.v1 import dataset_service_pb2, dataset_service_pb2_grpc


def records(count: int, size: int = 200, seed: int = 0) -> bytes:
    """Distinct chat records, about `size` bytes each."""
    return b"".join(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"question {seed}-{i} " + "x" * size},
                    {"role": "assistant", "content": f"answer {i}"},
                ]
            }
        ).encode()
        + b"\n"
        for i in range(count)
    )


def upload(channel: grpc.Channel, data: bytes, name: str = "d") -> None:
    stub = dataset_service_pb2_grpc.DatasetServiceStub(channel)
    request = dataset_service_pb2.UploadDatasetRequest

    def messages() -> Iterator[dataset_service_pb2.UploadDatasetRequest]:
        yield request(header=dataset_service_pb2.UploadDatasetHeader(display_name=name))
        for start in range(0, len(data), 256 * 1024):
            yield request(chunk=data[start : start + 256 * 1024])
        yield request(finish_write=True)

    stub.UploadDataset(messages(), timeout=120)


def list_datasets(channel: grpc.Channel) -> int:
    stub = dataset_service_pb2_grpc.DatasetServiceStub(channel)
    return len(stub.ListDatasets(dataset_service_pb2.ListDatasetsRequest(), timeout=10).datasets)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 24 MiB tmpfs: a disk that fills."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(mount)], capture_output=True
    )
    if done.returncode != 0:
        pytest.fail(f"cannot mount a tmpfs (the test needs root): {done.stderr.decode()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_disk_is_resource_exhausted_and_reads_go_on(small_disk: Path) -> None:
    no_accounting = {"storage": {"upload_space_factor": 0}}  # the disk itself says it is full
    with (
        LocalServer(small_disk / "data", no_accounting) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        upload(channel, records(50), "first")
        refused = None
        for attempt in range(40):
            try:
                upload(channel, records(20_000, seed=attempt + 1), f"big-{attempt}")
            except grpc.RpcError as error:
                refused = error
                break
        assert refused is not None, "the disk never filled"
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
        info = error_info(refused)
        assert info is not None and info.reason == "DISK_FULL"
        assert list_datasets(channel) >= 1  # what was stored is still served
        assert not list((small_disk / "data" / "work" / "datasets").glob("upload-*"))
        assert "Traceback" not in server.log.read_text()


def spool_bytes(data: Path) -> int:
    spools = (data / "work" / "datasets").glob("upload-*/records.spool")
    return sum(spool.stat().st_size for spool in spools if spool.exists())


def test_uploads_the_disk_could_not_finish_are_refused_before_it_fills(small_disk: Path) -> None:
    """Two uploads that each fit the 24 MiB disk alone but not together: the second is refused
    (INSUFFICIENT_SPACE) while both stream, the first finishes, the disk never fills."""
    data = small_disk / "data"
    first, second = records(8000, seed=1), records(9000, seed=2)
    with (
        LocalServer(data, {"storage": {"min_free_bytes": 1024 * 1024}}) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        halfway = threading.Event()
        outcomes: dict[str, object] = {}

        def send(name: str, data_: bytes, pause: threading.Event | None) -> None:
            stub = dataset_service_pb2_grpc.DatasetServiceStub(channel)
            request = dataset_service_pb2.UploadDatasetRequest

            def messages() -> Iterator[dataset_service_pb2.UploadDatasetRequest]:
                yield request(header=dataset_service_pb2.UploadDatasetHeader(display_name=name))
                for index, start in enumerate(range(0, len(data_), 64 * 1024)):
                    if pause is not None and index == 20:
                        halfway.set()
                        pause.wait(120)
                    yield request(chunk=data_[start : start + 64 * 1024])
                yield request(finish_write=True)

            try:
                outcomes[name] = stub.UploadDataset(messages(), timeout=180)
            except grpc.RpcError as error:
                outcomes[name] = error

        go_on = threading.Event()
        first_thread = threading.Thread(target=send, args=("first", first, go_on))
        first_thread.start()
        assert halfway.wait(60)
        # Wait until the server has written what the first upload sent so far.
        deadline = time.monotonic() + 60
        while spool_bytes(data) < 18 * 64 * 1024 and time.monotonic() < deadline:
            time.sleep(0.05)
        send("second", second, None)  # streams while the first waits halfway
        go_on.set()
        first_thread.join(180)
        refused = outcomes["second"]
        assert isinstance(refused, grpc.RpcError), refused
        assert refused.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, refused
        info = error_info(refused)
        assert info is not None and info.reason == "INSUFFICIENT_SPACE", refused
        assert not isinstance(outcomes["first"], grpc.RpcError), outcomes["first"]
        assert list_datasets(channel) == 1
        upload(channel, records(2000, seed=3), "after")  # the space came back
        assert not list((data / "work" / "datasets").glob("upload-*"))
        log = server.log.read_text()
        assert "No space left" not in log and "Traceback" not in log


def test_a_locked_database_is_unavailable_and_reads_go_on(tmp_path: Path) -> None:
    settings = {"storage": {"sqlite_busy_timeout_seconds": 1.0}}
    with (
        LocalServer(tmp_path / "data", settings) as server,
        grpc.insecure_channel(server.target) as channel,
    ):
        upload(channel, records(10), "first")
        locker = sqlite3.connect(tmp_path / "data" / "tunefleet.db", isolation_level=None)
        locker.execute("BEGIN IMMEDIATE")  # another process writes, and takes its time
        try:
            assert list_datasets(channel) == 1  # reads do not wait for the writer
            with pytest.raises(grpc.RpcError) as refused:
                upload(channel, records(10, seed=1), "second")
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE, refused.value
            info = error_info(refused.value)
            assert info is not None and info.reason == "DATABASE_BUSY"
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        upload(channel, records(10, seed=2), "third")  # retrying works
        assert list_datasets(channel) == 2


def test_a_read_only_data_folder_refuses_to_start(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with LocalServer(data):
        pass  # creates the database and folders
    read_only = tmp_path / "ro"
    read_only.mkdir()
    mounted = (
        subprocess.run(
            ["mount", "--bind", str(data), str(read_only)], capture_output=True
        ).returncode
        == 0
        and subprocess.run(
            ["mount", "-o", "remount,bind,ro", str(read_only)], capture_output=True
        ).returncode
        == 0
    )
    if not mounted:
        pytest.fail("cannot bind-mount read-only (the test needs root)")
    try:
        server = LocalServer(read_only)
        server.config = tmp_path / "ro.yaml"  # the settings file cannot go in the folder
        server.log = tmp_path / "ro.log"
        with pytest.raises(RuntimeError, match="exited"):
            server.start(60)
        lines = [line for line in server.log.read_text().splitlines() if line.strip()]
        assert any("read-only" in line or "not writable" in line for line in lines), lines
        assert not any("Traceback" in line for line in lines), lines
    finally:
        subprocess.run(["umount", "-l", str(read_only)], check=False)


def test_no_spools_are_left_after_killed_uploads(tmp_path: Path) -> None:
    data = tmp_path / "data"
    spools = data / "work" / "datasets"
    for attempt in range(5):
        server = LocalServer(data).start(120)
        # An upload that never finishes: half of it is sent, then the server is killed.
        child = subprocess.Popen(
            [sys.executable, "-c", HALF_UPLOAD, server.target, str(attempt)],
            stdout=subprocess.PIPE,
        )
        assert child.stdout is not None
        assert child.stdout.readline() == b"SENT\n"
        # Until the upload holds its spool: a spool killed before it was held (between its
        # mkdir and its lock file) counts as being created for a minute, and is kept.
        deadline = time.monotonic() + 60
        while not list(spools.glob(f"upload-*/{OWNER}")) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert server.process is not None
        os.kill(server.process.pid, signal.SIGKILL)
        server.process.wait()
        child.kill()
        child.wait()
        assert list(spools.glob("upload-*"))  # what a killed upload leaves behind
    with LocalServer(data) as server:
        assert not list(spools.glob("upload-*"))
        with grpc.insecure_channel(server.target) as channel:
            upload(channel, records(10), "after")
            assert list_datasets(channel) == 1


HALF_UPLOAD = """
import sys, threading, grpc
from tunefleet.v1 import dataset_service_pb2 as pb, dataset_service_pb2_grpc as rpc
from tests.runtime.test_faults import records
data = records(5000, seed=int(sys.argv[2]))
def messages():
    yield pb.UploadDatasetRequest(header=pb.UploadDatasetHeader(display_name="killed"))
    yield pb.UploadDatasetRequest(chunk=data[: len(data) // 2])
    print("SENT", flush=True)
    threading.Event().wait()
with grpc.insecure_channel(sys.argv[1]) as channel:
    try:
        rpc.DatasetServiceStub(channel).UploadDataset(messages())
    except grpc.RpcError:
        pass
"""
