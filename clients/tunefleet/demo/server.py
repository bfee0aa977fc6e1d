"""`tunefleet serve` as a child process with a settings file: what the demo (and the CLI's tests)
run against."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class LocalServer:
    """All four services in one `tunefleet serve` process (the embedded shape) on free ports.

    `settings` is merged into the generated settings file (data directory, ports, log level);
    with TLS in them, `credentials` are what the readiness check connects with. `executable` is
    the `tunefleet` command to run, by default the one beside this Python; `services` picks some
    of the four (the cluster shape: one process per service, all sharing `data_dir`).
    """

    def __init__(
        self,
        data_dir: Path,
        settings: dict[str, Any] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
        executable: Path | None = None,
        services: Sequence[str] = (),
    ) -> None:
        self.data_dir = data_dir
        self.executable = executable or Path(sys.executable).with_name("tunefleet")
        self.credentials = credentials
        self.port, self.metrics_port, self.openai_port = free_port(), free_port(), free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        self.services = list(services)
        suffix = "".join(f"-{service}" for service in services)
        self.config = data_dir / f"tunefleet{suffix}.yaml"
        self.log = data_dir / f"server{suffix}.log"
        base: dict[str, Any] = {
            "data_dir": str(data_dir),
            "server": {"port": self.port, "metrics_port": self.metrics_port},
            "openai": {"port": self.openai_port},
            "logging": {"level": "INFO"},
        }
        for key, value in (settings or {}).items():
            base[key] = {**base[key], **value} if isinstance(value, dict) and key in base else value
        self.settings = base
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 120.0) -> LocalServer:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.config.write_text(yaml.safe_dump(self.settings))
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [
                    str(self.executable),
                    "serve",
                    "--config",
                    str(self.config),
                    "--exit-with-parent",  # a killed demo or test leaves no server behind
                    *self.services,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        channel = (
            grpc.secure_channel(self.target, self.credentials)
            if self.credentials
            else grpc.insecure_channel(self.target)
        )
        with channel:
            health = health_pb2_grpc.HealthStub(channel)
            while time.monotonic() < deadline:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"tunefleet serve exited with {self.process.returncode}:\n{self.tail()}"
                    )
                try:
                    answer = health.Check(health_pb2.HealthCheckRequest(), timeout=1)
                    if answer.status == health_pb2.HealthCheckResponse.SERVING:
                        return self  # every service has started
                except grpc.RpcError:
                    pass
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(
            f"tunefleet serve was not healthy within {timeout:.0f} s:\n{self.tail()}"
        )

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM, as a process manager would; the exit code."""
        if self.process is None:
            return 0
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def tail(self, lines: int = 40) -> str:
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
