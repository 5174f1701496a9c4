"""Consuming engine streams for HTTP: server-sent events, several prompts at once, and disconnects.

Every way a request can end early — the client goes away, the handler fails, the server stops —
must abort its engine requests, or their KV blocks stay taken until they would have finished.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any, AsyncIterator, Callable

from pydantic import BaseModel
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from pagedserve.outputs import RequestOutput

DONE = "data: [DONE]\n\n"


def sse(payload: BaseModel | dict[str, Any]) -> str:
    """One server-sent event. Chunk models are dumped without the fields never set, as vLLM does."""
    if isinstance(payload, BaseModel):
        return f"data: {payload.model_dump_json(exclude_unset=True)}\n\n"
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def json_response(payload: BaseModel) -> Response:
    """A whole response body. pydantic sends non-finite floats as null; json.dumps would fail on them."""
    return Response(payload.model_dump_json(), media_type="application/json")


class ClosingStreamingResponse(StreamingResponse):
    """A streamed response that closes its generator and calls its `on_close` callbacks however it ends.

    NOTE: when the client disconnects, Starlette cancels the sending task and leaves the generator
    suspended (or never started, so its own `finally` would never run); the callbacks are where the
    engine requests get aborted and the model released.
    """

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None], media_type: str) -> None:
        super().__init__(content, media_type=media_type,
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = [on_close]

    def also_on_close(self, callback: Callable[[], None]) -> None:
        self._on_close.append(callback)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            try:
                await self.body_iterator.aclose()
            finally:
                for callback in self._on_close:
                    callback()


class EventStreamResponse(ClosingStreamingResponse):
    """Server-sent events (the OpenAI API)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, on_close, "text/event-stream")


class NDJSONResponse(ClosingStreamingResponse):
    """One JSON object per line (the Ollama API)."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(content, on_close, "application/x-ndjson")


async def merge_streams(streams: list[Any]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(stream index, output) from several RequestStreams as outputs arrive. Leaving early aborts all."""
    pending: dict[asyncio.Task, int] = {}
    try:
        for index, stream in enumerate(streams):
            pending[asyncio.ensure_future(stream.__anext__())] = index
        while pending:
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=pending.get):
                index = pending.pop(task)
                try:
                    output = task.result()
                except StopAsyncIteration:
                    continue
                yield index, output
                pending[asyncio.ensure_future(streams[index].__anext__())] = index
    finally:
        for task in pending:
            task.cancel()
        for stream in streams:
            stream.abort()


async def collect_final(streams: list[Any], request: Request) -> list[RequestOutput] | None:
    """The last output of each stream, or None if the client disconnected first (all aborted then)."""
    finals: list[RequestOutput | None] = [None] * len(streams)

    async def consume() -> None:
        merged = merge_streams(streams)
        try:
            async for index, output in merged:
                finals[index] = output
        finally:
            await merged.aclose()

    consumer = asyncio.ensure_future(consume())
    watcher = asyncio.ensure_future(wait_for_disconnect(request))
    try:
        done, _ = await asyncio.wait([consumer, watcher], return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not consumer.done():
            consumer.cancel()
            for stream in streams:
                stream.abort()
            await asyncio.wait([consumer])   # let it finish closing; raises nothing
    if consumer not in done:
        return None
    consumer.result()   # re-raises what the engine raised
    return finals


async def collect_tracked(streams: list[Any], request: Request, tracker: Any) -> list[RequestOutput] | None:
    """collect_final, then close the request's tracker, marked completed unless the client left."""
    try:
        finals = await collect_final(streams, request)
        tracker.completed = finals is not None
    except BaseException as error:
        tracker.fail(error)
        raise
    finally:
        tracker.close()
    return finals


async def wait_for_disconnect(request: Request) -> None:
    """Returns when the client hangs up. Only call once the body has been read."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return
