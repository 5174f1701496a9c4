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
from typing import Callable, Iterator, TypeVar

import httpx

# Loading SmolLM2 takes 15-30 s on a busy 2-core machine; importing torch and transformers adds more.
READY_TIMEOUT_SECONDS = 240
# Never in the log of a server that works: bad requests and disconnects are the client's business.
TROUBLE_SIGNS = ("Traceback", "ERROR", "Task was destroyed", "never awaited", "Exception in ASGI")

RUNNING = "vllm:num_requests_running"
FREE_BLOCKS = "pagedserve:kv_cache_free_blocks"
TOTAL_BLOCKS = "pagedserve:kv_cache_total_blocks"

T = TypeVar("T")


def wait_until(condition: Callable[[], T], what: str | Callable[[], str], timeout: float = 30.0,
               interval: float = 0.1) -> T:
    """Poll `condition()` until it returns something truthy, and return that. After `timeout` seconds,
    fail saying what was awaited: `what`, or what `what()` says then (say, the values last seen)."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what() if callable(what) else what}")
        time.sleep(interval)


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
        self.listening_health: httpx.Response | None = None   # see wait_listening
        self.log_when_listening = ""
        self._num_log_bytes_checked = 0

    def start(self) -> ServerProcess:
        with self._log_file.open("wb") as log:
            self.process = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT, env=self._env,
                                            cwd=Path(__file__).parent.parent)
        return self

    @contextmanager
    def running(self, until_ready: bool = True) -> Iterator[ServerProcess]:
        """Started (and ready, unless not `until_ready`) inside the block; stopped after it, also when it
        never became ready."""
        self.start()
        try:
            yield self.wait_ready() if until_ready else self
        finally:
            self.stop()

    def wait_listening(self, timeout: float = READY_TIMEOUT_SECONDS) -> ServerProcess:
        """Wait for the start-up line saying the server listens, then ask /health once: uvicorn listens
        before the models load in the background (which takes seconds). `listening_health` keeps that
        answer and `log_when_listening` the log as it stood once the answer came."""
        self.wait_for_log(" listening on ", timeout)
        self.listening_health = httpx.get(self.url("/health"), timeout=30)
        self.log_when_listening = self.log()
        return self

    def wait_for_log(self, text: str, timeout: float = 30) -> str:
        """The log once it contains `text`; fails if the server exits first."""
        def logged() -> str:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            log = self.log()
            return log if text in log else ""

        return wait_until(logged, f"{text!r} in the server log", timeout)

    def wait_ready(self, timeout: float = READY_TIMEOUT_SECONDS) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited with {self.process.returncode}:\n{self.log()[-3000:]}")
            try:
                if httpx.get(self.base_url + "/health", timeout=5).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"server not ready after {timeout} s:\n{self.log()[-3000:]}")

    def log(self) -> str:
        return self._log_file.read_text(errors="replace")

    def check_log(self) -> None:
        """The log written since the last check shows nothing went wrong inside (see TROUBLE_SIGNS)."""
        written = self._log_file.read_bytes()
        new = written[self._num_log_bytes_checked:].decode(errors="replace")
        self._num_log_bytes_checked = len(written)
        for sign in TROUBLE_SIGNS:
            if sign in new:
                index = new.index(sign)
                raise AssertionError(f"{sign!r} in the server log:\n{new[max(index - 2000, 0):index + 2000]}")

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

    def wait_for_metrics(self, expected: dict[str, float], timeout: float = 15.0) -> None:
        """Wait until each /metrics sample named in `expected` has its value (see `metric`)."""
        seen: dict[str, float] = {}

        def reached() -> bool:
            seen.update({name: self.metric(name) for name in expected})
            return seen == expected

        wait_until(reached, lambda: f"metrics {expected}; last seen {seen}", timeout)

    def wait_idle(self, timeout: float = 15.0) -> None:
        """Wait until no request runs and every KV block is free (a server with one model loaded)."""
        seen: dict[str, float] = {}

        def idle() -> bool:
            seen.update({name: self.metric(name) for name in (RUNNING, FREE_BLOCKS, TOTAL_BLOCKS)})
            return seen[RUNNING] == 0 and seen[FREE_BLOCKS] == seen[TOTAL_BLOCKS]

        wait_until(idle, lambda: f"no running request and every KV block free; last seen {seen}", timeout)


def sse_events(response: httpx.Response) -> list[dict | str]:
    """The data of each server-sent event of a finished streaming response; '[DONE]' stays a string."""
    events: list[dict | str] = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events
