"""The gateway's nginx configuration (deploy/base/gateway.conf) run by Debian's nginx on 127.0.0.1
in front of given upstreams: for tests/deploy/test_gateway.py and benchmarks/gateway.py."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from tunefleet.demo.server import free_port

GATEWAY_CONF = Path(__file__).resolve().parents[2] / "deploy" / "base" / "gateway.conf"


def local_config(
    config: str, upstreams: Mapping[str, str], port: int, directory: Path, http_port: int = 0
) -> str:
    """The cluster's configuration with each Service name replaced by a local address (the
    OpenAI front's `openai`, if given; a closed port otherwise), listening on `port` (and the
    front's `http_port`), with its pid and temporary files in `directory`."""
    for key, target in upstreams.items():
        config = config.replace(f"server tunefleet-{key}:50051;", f"server {target};")
    front = upstreams.get("openai", "127.0.0.1:9")
    config = config.replace("server tunefleet-openai:8000;", f"server {front};")
    config = config.replace("listen 8000;", f"listen 127.0.0.1:{http_port or free_port()};")
    config = config.replace("listen 50051 http2", f"listen 127.0.0.1:{port} http2")
    config = config.replace("listen 8081", f"listen 127.0.0.1:{free_port()}")
    return config.replace(" /tmp/", f" {directory}/")


@contextmanager
def running_gateway(
    directory: Path,
    upstreams: Mapping[str, str],
    config: str | None = None,
    http_port: int = 0,
    port: int = 0,
) -> Iterator[str]:
    """nginx with the gateway configuration; its gRPC address (on `port`, or a free one) while
    the block runs (the OpenAI front's on `http_port`, when given)."""
    nginx = shutil.which("nginx")
    if nginx is None:
        raise FileNotFoundError("nginx not found (Debian package nginx)")
    directory.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    text = local_config(config or GATEWAY_CONF.read_text(), upstreams, port, directory, http_port)
    (directory / "nginx.conf").write_text(text)
    log = directory / "nginx.log"
    command = [nginx, "-e", "stderr", "-p", str(directory), "-c", str(directory / "nginx.conf")]
    with log.open("wb") as errors:
        process = subprocess.Popen([*command, "-g", "daemon off;"], stderr=errors)
    try:
        deadline = time.monotonic() + 10
        while not _listening(port):
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nginx did not start: {log.read_text()}")
            time.sleep(0.1)
        yield f"127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


def _listening(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0
