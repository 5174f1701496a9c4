"""A pass-through HTTP proxy on 127.0.0.1 that keeps every request body and response body it forwards, so a
check can read exactly what a client (Open WebUI) sent to the server and what came back, streams included."""
from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any, Self

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import StreamingResponse
from starlette.routing import Route

from tests.server_process import free_port, wait_until

# Hop-by-hop headers and the ones the proxy recomputes.
_DROPPED_HEADERS = {"host", "content-length", "connection", "transfer-encoding", "keep-alive"}


@dataclass(frozen=True)
class Exchange:
    method: str
    path: str
    request_body: bytes
    status: int
    response_body: bytes

    def request_json(self) -> Any:
        return json.loads(self.request_body) if self.request_body else None

    def response_events(self) -> list[dict[str, Any]]:
        """The JSON events of a server-sent event stream ('[DONE]' left out)."""
        events = []
        for line in self.response_body.decode(errors="replace").splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                events.append(json.loads(line[len("data: "):]))
        return events

    def response_json(self) -> Any:
        return json.loads(self.response_body)


class RecordingProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.exchanges: list[Exchange] = []
        self._lock = threading.Lock()
        app = Starlette(routes=[Route("/{path:path}", self._forward, methods=["GET", "POST", "DELETE", "PUT"])])
        self._server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self._thread = threading.Thread(target=self._server.run, daemon=True)
        self._client: httpx.AsyncClient | None = None

    def __enter__(self) -> Self:
        self._thread.start()
        wait_until(lambda: self._server.started, what="the recording proxy to listen")
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)

    def recorded(self, path_suffix: str) -> list[Exchange]:
        with self._lock:
            return [exchange for exchange in self.exchanges if exchange.path.endswith(path_suffix)]

    async def _forward(self, request: Request) -> StreamingResponse:
        if self._client is None:      # made on the proxy's own event loop
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(600.0))
        body = await request.body()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _DROPPED_HEADERS}
        headers["accept-encoding"] = "identity"     # recorded as sent, never compressed
        upstream = self._client.build_request(request.method, self.upstream + request.url.path,
                                              params=request.query_params, headers=headers, content=body)
        response = await self._client.send(upstream, stream=True)
        chunks: list[bytes] = []

        async def relay():
            async for chunk in response.aiter_raw():
                chunks.append(chunk)
                yield chunk

        def keep() -> None:
            with self._lock:
                self.exchanges.append(Exchange(request.method, request.url.path, body, response.status_code,
                                               b"".join(chunks)))

        async def close() -> None:
            await response.aclose()
            keep()

        kept_headers = {k: v for k, v in response.headers.items() if k.lower() not in _DROPPED_HEADERS}
        return StreamingResponse(relay(), status_code=response.status_code, headers=kept_headers,
                                 background=BackgroundTask(close))
