"""The engine's step loop on a background thread, and one async stream of outputs per request.

The engine itself is single-threaded: only the loop thread touches it. Callers on the event loop
hand it checked requests (`EngineRequest`) and aborts through a queue; outputs come back through each
request's asyncio queue. A request whose consumer goes away (client disconnect, cancellation) is
aborted, which frees its KV blocks at the start of the next step.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
from dataclasses import dataclass
from typing import Any, Callable

from pagedserve.engine.llm_engine import EngineStats, LLMEngine
from pagedserve.engine.processor import EngineRequest
from pagedserve.outputs import RequestOutput

logger = logging.getLogger(__name__)

_IDLE_WAIT_SECONDS = 1.0

# Called on the loop thread after every step (and about once a second when idle) with the engine's
# stats and the step's outputs: the metrics hook.
StepHook = Callable[[EngineStats, list[RequestOutput]], None]


class EngineDeadError(RuntimeError):
    pass


_ACCEPTED = object()   # first item on a request's queue once the engine has queued it


@dataclass(frozen=True)
class _Add:
    request: EngineRequest
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue

    def put(self, item: object) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


@dataclass(frozen=True)
class _Abort:
    request_id: str


@dataclass(frozen=True)
class _Call:
    """Run `function(engine)` on the loop thread (the only one that may touch the engine)."""

    function: Callable[[LLMEngine], Any]
    future: concurrent.futures.Future


class RequestStream:
    """Async iterator over one request's outputs. Call `abort()` if you stop before it finishes."""

    def __init__(self, request: EngineRequest, queue_: asyncio.Queue, engine: AsyncEngine) -> None:
        self.request_id = request.request_id
        self.prompt_token_ids = request.prompt_token_ids
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
    def __init__(self, engine: LLMEngine, on_step: StepHook | None = None) -> None:
        self.engine = engine
        self._on_step = on_step
        self._inbox: queue.SimpleQueue[_Add | _Abort | _Call | None] = queue.SimpleQueue()
        self._streams: dict[str, _Add] = {}
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pagedserve-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopping.is_set()

    async def add_request(self, request: EngineRequest) -> RequestStream:
        """Queue a checked request; returns its output stream once the engine accepted it.

        Raises ValueError (nothing queued) when the engine refuses it (a request id already in use).
        """
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        queue_: asyncio.Queue = asyncio.Queue()
        self._inbox.put(_Add(request, asyncio.get_running_loop(), queue_))
        first = await queue_.get()
        if isinstance(first, BaseException):
            raise first
        return RequestStream(request, queue_, self)

    def abort(self, request_id: str) -> None:
        self._inbox.put(_Abort(request_id))

    async def call(self, function: Callable[[LLMEngine], Any]) -> Any:
        """`function(engine)` between steps, on the loop thread; its result or its exception."""
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._inbox.put(_Call(function, future))
        return await asyncio.wrap_future(future)

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._inbox.put(None)
        self._thread.join(timeout)

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._drain_inbox(block=not self.engine.has_unfinished_requests())
            if not self.engine.has_unfinished_requests():
                self._report([])
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
            self._report(outputs)
        self._fail_all(EngineDeadError("the server is shutting down"))
        self._fail_pending_calls()

    def _fail_pending_calls(self) -> None:
        """Requests and calls queued as the loop stopped get an answer, not a wait forever."""
        try:
            while True:
                command = self._inbox.get_nowait()
                if isinstance(command, _Call):
                    command.future.set_exception(EngineDeadError("the server is shutting down"))
                elif isinstance(command, _Add):
                    command.put(EngineDeadError("the server is shutting down"))
        except queue.Empty:
            pass

    def _report(self, outputs: list[RequestOutput]) -> None:
        if self._on_step is not None:
            self._on_step(self.engine.stats(), outputs)

    def _drain_inbox(self, block: bool) -> None:
        try:
            command = self._inbox.get(timeout=_IDLE_WAIT_SECONDS) if block else self._inbox.get_nowait()
            while True:
                self._apply(command)
                command = self._inbox.get_nowait()
        except queue.Empty:
            pass

    def _apply(self, command: _Add | _Abort | _Call | None) -> None:
        if command is None:
            return
        if isinstance(command, _Call):
            try:
                command.future.set_result(command.function(self.engine))
            except Exception as error:   # the caller's to answer (e.g. a bad adapter: a 4xx)
                command.future.set_exception(error)
            return
        if isinstance(command, _Abort):
            self._streams.pop(command.request_id, None)
            self.engine.abort_request(command.request_id)
            return
        try:
            self.engine.add_request(command.request)
        except ValueError as error:
            command.put(error)
            return
        self._streams[command.request.request_id] = command
        command.put(_ACCEPTED)

    def _fail_all(self, error: BaseException) -> None:
        request_ids = list(self._streams)
        self.engine.abort_request(request_ids)
        for request_id in request_ids:
            self._streams.pop(request_id).put(error)
