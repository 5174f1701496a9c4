"""A `python -m pagedserve serve ...` subprocess on 127.0.0.1 and a free port, for tests over real HTTP."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx

# Loading SmolLM2 takes 15-30 s on a busy 2-core machine; importing torch and transformers adds more.
READY_TIMEOUT_SECONDS = 240


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    def __init__(self, args: list[str], env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.command = [sys.executable, "-m", "pagedserve", "serve", *args, "--host", "127.0.0.1",
                        "--port", str(self.port)]
        self._env = {**os.environ, **(env or {})}
        self._log_file = Path(tempfile.mkstemp(prefix="pagedserve-server-", suffix=".log")[1])
        self.process: subprocess.Popen | None = None
        self.health_statuses: set[int] = set()    # what /health answered while we waited

    def start(self) -> ServerProcess:
        with self._log_file.open("wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self._env,
                                            cwd=Path(__file__).parent.parent)
        return self

    @contextmanager
    def running(self) -> Iterator[ServerProcess]:
        """Started and ready inside the block; stopped after it, also when it never became ready."""
        self.start()
        try:
            yield self.wait_ready()
        finally:
            self.stop()

    def wait_ready(self, timeout: float = READY_TIMEOUT_SECONDS) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            try:
                status = httpx.get(self.base_url + "/health", timeout=5).status_code
                self.health_statuses.add(status)
                if status == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self._log_file.read_text(errors="replace")

    def url(self, path: str) -> str:
        return self.base_url + path

    def terminate(self, timeout: float = 30) -> int:
        """SIGTERM, then wait; returns the exit code (kills after `timeout`)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode

    def stop(self) -> None:
        self.terminate()
        self._log_file.unlink(missing_ok=True)

    def metric(self, name: str, default: float = 0.0) -> float:
        """One sample of /metrics: 'vllm:num_requests_running' (any labels) or a full 'name{labels}'."""
        for line in httpx.get(self.url("/metrics"), timeout=10).text.splitlines():
            if line.startswith(name + " ") or ("{" not in name and line.startswith(name + "{")):
                return float(line.rsplit(" ", 1)[1])
        return default


def sse_events(response: httpx.Response) -> list[dict | str]:
    """The data of each server-sent event of a finished streaming response; '[DONE]' stays a string."""
    events: list[dict | str] = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events
