"""Runs tritonserver from a prepared TritonEnvironment on loopback with free ports, until the caller is done.

Process plumbing only (ports, readiness over HTTP, log capture, shutdown); it writes no model files.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from hps_client.triton.environment import TritonEnvironment


class TritonStartError(RuntimeError):
    """tritonserver exited or was not ready in time; the message quotes its log's errors."""


@dataclass(frozen=True)
class TritonEndpoint:
    grpc_target: str
    http_url: str
    log_file: Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def command(
    environment: TritonEnvironment, repository: Path, grpc_port: int, http_port: int, extra: Sequence[str] = ()
) -> list[str]:
    return [
        str(environment.tritonserver),
        f"--model-repository={repository}",
        f"--backend-directory={environment.backends}",
        "--grpc-address=127.0.0.1",
        f"--grpc-port={grpc_port}",
        "--http-address=127.0.0.1",
        f"--http-port={http_port}",
        "--allow-metrics=false",
        # Triton waits this long for in-flight requests on shutdown (30 s by default).
        "--exit-timeout-secs=5",
        *extra,
    ]


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/v2/health/ready", timeout=1) as reply:
            return bool(reply.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _log_errors(path: Path, lines: int = 20) -> str:
    """Triton's error lines (glog "E..."), which its start-up tables would push out of a plain tail."""
    text = path.read_text(errors="replace").splitlines() if path.exists() else []
    errors = [line for line in text if line[:1] == "E" and line[1:5].isdigit()]
    return "\n".join([*errors[-lines:], *text[-1:]])


@contextlib.contextmanager
def running(
    environment: TritonEnvironment,
    repository: str | Path,
    *,
    extra_args: Sequence[str] = (),
    timeout: float = 120.0,
    log_dir: str | Path | None = None,
) -> Iterator[TritonEndpoint]:
    """Starts tritonserver over `repository`, waits until every model is ready, yields its endpoints, stops it."""
    with contextlib.ExitStack() as stack:
        folder = Path(log_dir) if log_dir is not None else Path(stack.enter_context(tempfile.TemporaryDirectory()))
        log_file = folder / "tritonserver.log"
        grpc_port, http_port = free_port(), free_port()
        endpoint = TritonEndpoint(f"127.0.0.1:{grpc_port}", f"http://127.0.0.1:{http_port}", log_file)
        with log_file.open("wb") as log:
            process = subprocess.Popen(
                command(environment, Path(repository).resolve(), grpc_port, http_port, extra_args),
                stdout=log,
                stderr=subprocess.STDOUT,
                env=environment.process_environment(),
            )
        try:
            deadline = time.monotonic() + timeout
            while not _ready(endpoint.http_url):
                if process.poll() is not None:
                    raise TritonStartError(f"tritonserver exited with {process.returncode}:\n{_log_errors(log_file)}")
                if time.monotonic() > deadline:
                    raise TritonStartError(f"tritonserver not ready after {timeout} s:\n{_log_errors(log_file)}")
                time.sleep(0.2)
            yield endpoint
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
