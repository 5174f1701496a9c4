"""The engine's step loop on a background thread, and one async stream of outputs per request.

The engine itself is single-threaded: only the loop thread touches it. Callers on the event loop
hand it requests and aborts through a queue; outputs come back through each request's asyncio queue.
A request whose consumer goes away (client disconnect, cancellation) is aborted, which frees its KV
blocks at the start of the next step.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.outputs import RequestOutput
from pagedserve.sampling_params import SamplingParams

logger = logging.getLogger(__name__)

_IDLE_WAIT_SECONDS = 1.0


class EngineDeadError(RuntimeError):
    pass


_ACCEPTED = object()   # first item on a request's queue once the engine has queued it


@dataclass(frozen=True)
class _Add:
    request_id: str
    prompt: str | list[int]
    params: SamplingParams
    add_special_tokens: bool
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: object) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


@dataclass(frozen=True)
class _Abort:
    request_id: str


class RequestStream:
    """Async iterator over one request's outputs. Call `abort()` if you stop before it finishes."""

    def __init__(self, request_id: str, queue_: asyncio.Queue, engine: AsyncEngine) -> None:
        self.request_id = request_id
        self._queue = queue_
        self._engine = engine
        self.finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._queue.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, on_step: Callable[[LLMEngine, list[RequestOutput]], None] | None = None
                 ) -> None:
        self.engine = engine
        self._on_step = on_step
        self._inbox: queue.SimpleQueue[_Add | _Abort | None] = queue.SimpleQueue()
        self._streams: dict[str, _Add] = {}
        self._ids = itertools.count()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pagedserve-engine", daemon=True)
        self._thread.start()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopping.is_set()

    async def add_request(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                          add_special_tokens: bool = True) -> RequestStream:
        """Queue a request; returns its output stream once the engine accepted it.

        Raises ValueError (nothing queued) when the engine rejects it, e.g. a prompt over the limit.
        """
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        request_id = request_id or f"req-{next(self._ids)}"
        queue_: asyncio.Queue = asyncio.Queue()
        self._inbox.put(_Add(request_id, prompt, params, add_special_tokens, asyncio.get_running_loop(), queue_))
        first = await queue_.get()
        if isinstance(first, BaseException):
            raise first
        return RequestStream(request_id, queue_, self)

    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                       add_special_tokens: bool = True) -> AsyncIterator[RequestOutput]:
        """Outputs of one request; leaving the loop early aborts it."""
        stream = await self.add_request(prompt, params, request_id, add_special_tokens)
        try:
            async for output in stream:
                yield output
        finally:
            stream.abort()

    def abort(self, request_id: str) -> None:
        self._inbox.put(_Abort(request_id))

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._inbox.put(None)
        self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._drain_inbox(block=not self.engine.has_unfinished_requests())
            if not self.engine.has_unfinished_requests():
                if self._on_step is not None:
                    self._on_step(self.engine, [])
                continue
            try:
                outputs = self.engine.step()
            except Exception as error:   # a bug, not bad input: fail what is in flight, keep serving
                logger.exception("engine step failed; aborting %d requests", len(self._streams))
                self._fail_all(error)
                continue
            for output in outputs:
                request = self._streams.get(output.request_id)
                if request is not None:
                    request.put(output)
                    if output.finished:
                        del self._streams[output.request_id]
            if self._on_step is not None:
                self._on_step(self.engine, outputs)
        self._fail_all(EngineDeadError("the server is shutting down"))

    def _drain_inbox(self, block: bool) -> None:
        try:
            command = self._inbox.get(timeout=_IDLE_WAIT_SECONDS) if block else self._inbox.get_nowait()
            while True:
                self._apply(command)
                command = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _apply(self, command: _Add | _Abort | None) -> None:
        if command is None:
            return
        if isinstance(command, _Abort):
            self._streams.pop(command.request_id, None)
            self.engine.abort_request(command.request_id)
            return
        try:
            self.engine.add_request(command.request_id, command.prompt, command.params,
                                    add_special_tokens=command.add_special_tokens)
        except ValueError as error:
            command.put(error)
            return
        self._streams[command.request_id] = command
        command.put(_ACCEPTED)

    def _fail_all(self, error: BaseException) -> None:
        request_ids = list(self._streams)
        self.engine.abort_request(request_ids)
        for request_id in request_ids:
            self._streams.pop(request_id).put(error)

