"""The engine's step loop on a background thread, and one async stream of outputs per request.

The engine itself is single-threaded: only the loop thread touches it. Callers on the event loop
hand it checked requests (`EngineRequest`) and aborts through a queue; outputs come back through each
request's asyncio queue. A request whose consumer goes away (client disconnect, cancellation) is
aborted, which frees its KV blocks at the start of the next step.

No single request can stop the loop: an error while queueing one, or while making its outputs (its
detokenizer, its logprobs), fails that request alone; an error in a step's model run fails the
requests in flight. Should the loop itself end for any other reason, every open stream gets an
`EngineDeadError`, new requests are refused with it, and `on_dead` is called so the server can exit
and a supervisor restart it.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable

from pagedserve.executor import RankFailedError
from pagedserve.engine.llm_engine import EngineStats, LLMEngine
from pagedserve.engine.processor import EngineRequest
from pagedserve.outputs import RequestOutput

logger = logging.getLogger(__name__)

_IDLE_WAIT_SECONDS = 1.0

# Called on the loop thread after every step (and about once a second when idle) with the engine's
# stats, the step's outputs and which engine stepped (0; a data parallel replica's index): the metrics hook.
StepHook = Callable[[EngineStats, list[RequestOutput], int], None]
# Where a queued request's items go, on the loop thread: ACCEPTED first, then its RequestOutputs, or an
# exception that ends it.
OutputSink = Callable[[object], None]
# Called once, on the loop thread, if the loop ends other than by shutdown(), with what ended it.
DeathHook = Callable[[BaseException], None]


class EngineDeadError(RuntimeError):
    pass


class EngineOverloadedError(RuntimeError):
    """Too busy for this request now (the queue is full, or it waited too long); retry later."""

    def __init__(self, message: str, reason: str, retry_after: int = 5) -> None:
        super().__init__(message)
        self.reason = reason             # "queue_full" or "queue_timeout"
        self.retry_after = retry_after   # seconds

    def __reduce__(self) -> tuple[Any, ...]:   # rebuilt whole after a pipe (data parallel replicas)
        return type(self), (str(self), self.reason, self.retry_after)


# Called with the reason each time a request is refused or dropped for load (EngineOverloadedError).
RejectHook = Callable[[str], None]


@dataclass(frozen=True)
class QueueLimits:
    """How many requests may wait for a place in the running batch, and for how long."""

    max_waiting: int | None = None        # beyond it new requests are refused; None: no limit
    max_queue_time: float | None = None   # seconds; a request waiting longer fails; None: no limit

    def __post_init__(self) -> None:
        if self.max_waiting is not None and self.max_waiting < 1:
            raise ValueError(f"max_waiting_requests must be positive, got {self.max_waiting}")
        if self.max_queue_time is not None and self.max_queue_time <= 0:
            raise ValueError(f"max_queue_time must be positive, got {self.max_queue_time}")


class RequestFailedError(RuntimeError):
    """The engine could not finish a request: a fault on the server's side, logged with its cause
    (`__cause__`); the message, which clients see, names neither."""

    def __init__(self, message: str, cause: BaseException) -> None:
        super().__init__(message)
        self.__cause__ = cause

    def __reduce__(self) -> tuple[Any, ...]:
        # NOTE: across a pipe the cause travels as its text (it was logged where it happened)
        cause = self.__cause__
        return type(self), (str(self), RuntimeError(f"{type(cause).__name__}: {cause}"))


class _Accepted:
    """The first item on a request's queue once the engine has queued it."""

    def __reduce__(self) -> str:   # one object, also after a trip through a pipe (data parallel replicas)
        return "ACCEPTED"


ACCEPTED = _Accepted()


@dataclass(frozen=True)
class _Add:
    request: EngineRequest
    put: OutputSink


@dataclass(frozen=True)
class _Abort:
    request_id: str


@dataclass(frozen=True)
class _Call:
    """Run `function(engine)` on the loop thread (the only one that may touch the engine)."""

    function: Callable[[LLMEngine], Any]
    future: concurrent.futures.Future


def asyncio_sink(queue_: asyncio.Queue) -> OutputSink:
    """A sink that hands each item to `queue_` on the running event loop (from any thread)."""
    loop = asyncio.get_running_loop()

    def put(item: object) -> None:
        loop.call_soon_threadsafe(queue_.put_nowait, item)

    return put


class RequestStream:
    """Async iterator over one request's outputs. Call `abort()` if you stop before it finishes."""

    def __init__(self, request: EngineRequest, queue_: asyncio.Queue, abort: Callable[[str], None],
                 engine_index: int = 0) -> None:
        """`abort(request_id)` stops it in the engine serving it (`engine_index`: a data parallel replica)."""
        self.request_id = request.request_id
        self.prompt_token_ids = request.prompt_token_ids
        self.engine_index = engine_index
        self._queue = queue_
        self._abort = abort
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
            self._abort(self.request_id)


class AsyncEngine:
    def __init__(self, engine: LLMEngine, on_step: StepHook | None = None, on_dead: DeathHook | None = None,
                 max_queue_time: float | None = None, on_reject: RejectHook | None = None,
                 engine_index: int = 0) -> None:
        """`engine_index`: which data parallel replica this is (passed to `on_step`)."""
        self.engine = engine
        self.engine_index = engine_index
        self._on_step = on_step
        self._on_dead = on_dead
        self._max_queue_time = max_queue_time
        self._on_reject = on_reject
        self._inbox: queue.SimpleQueue[_Add | _Abort | _Call | None] = queue.SimpleQueue()
        self._streams: dict[str, _Add] = {}
        self._stopping = threading.Event()
        # NOTE: held while a request enters the inbox and while the dying loop empties it, so no
        # request can be put there after the loop is gone (its caller would wait forever).
        self._inbox_lock = threading.Lock()
        self.death: BaseException | None = None   # what ended the loop, if not shutdown()
        self._thread = threading.Thread(target=self._run, name="pagedserve-engine", daemon=True)
        self._thread.start()

    @property
    def is_running(self) -> bool:
        return self._thread.is_alive() and not self._stopping.is_set() and self.death is None

    @property
    def num_waiting(self) -> int:
        """Requests the engine holds that wait for a place in the running batch (read off its thread:
        a length, so at worst a step old)."""
        return len(self.engine.scheduler.waiting)

    def stats(self) -> EngineStats:
        return self.engine.stats()

    async def add_request(self, request: EngineRequest) -> RequestStream:
        """Queue a checked request; returns its output stream once the engine accepted it.

        Raises ValueError (nothing queued) when the engine refuses it (a request id already in use).
        """
        queue_: asyncio.Queue = asyncio.Queue()
        self.submit(request, asyncio_sink(queue_))
        first = await queue_.get()
        if isinstance(first, BaseException):
            raise first
        return RequestStream(request, queue_, self.abort, self.engine_index)

    def submit(self, request: EngineRequest, put: OutputSink) -> None:
        """Queue a checked request whose items go to `put` (on the loop thread): ACCEPTED, or the exception
        that refused it, then its outputs. Raises EngineDeadError if the loop has stopped."""
        with self._inbox_lock:
            if not self.is_running:
                raise EngineDeadError("the engine is not running")
            self._inbox.put(_Add(request, put))

    def abort(self, request_id: str) -> None:
        self._inbox.put(_Abort(request_id))

    async def call(self, function: Callable[[LLMEngine], Any]) -> Any:
        """`function(engine)` between steps, on the loop thread; its result or its exception."""
        return await asyncio.wrap_future(self.call_soon(function))

    def call_soon(self, function: Callable[[LLMEngine], Any]) -> concurrent.futures.Future:
        """`function(engine)` between steps, on the loop thread: the future of its result."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._inbox_lock:
            if not self.is_running:
                raise EngineDeadError("the engine is not running")
            self._inbox.put(_Call(function, future))
        return future

    async def call_engine(self, method: str, *args: Any) -> Any:
        """`engine.method(*args)` between steps (the LoRA verbs): a call that could cross a pipe."""
        return await self.call(lambda engine: getattr(engine, method)(*args))

    def shutdown(self, timeout: float = 10.0) -> None:
        self._stopping.set()
        self._inbox.put(None)
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            self._loop()
        except BaseException as error:   # noqa: BLE001 - the loop is gone: say so everywhere, then end
            logger.critical("the engine loop died; every request in flight fails and no new one is accepted",
                            exc_info=error)
            self._die(error)
            return
        finally:
            self.engine.shutdown()   # the worker ranks, if any, end with the loop
        self._fail_all(EngineDeadError("the server is shutting down"))
        self._fail_pending(EngineDeadError("the server is shutting down"))

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._drain_inbox(block=not self.engine.has_unfinished_requests())
            if self._max_queue_time is not None:
                self._drop_waiting_too_long(self._max_queue_time)
            if not self.engine.has_unfinished_requests():
                self._report([])
                continue
            try:
                outputs = self.engine.step()
            except RankFailedError:   # the model's ranks are broken: no step can run any more, the loop dies
                raise
            except Exception as error:   # a bug, not bad input: fail what is in flight, keep serving
                logger.exception("engine step failed; aborting %d requests", len(self._streams))
                self._fail_all(RequestFailedError("the engine failed while running this request", error))
                continue
            for output in outputs:
                request = self._streams.get(output.request_id)
                if request is not None:
                    request.put(output)
                    if output.finished:
                        del self._streams[output.request_id]
            self._fail_requests(self.engine.take_failures())
            self._report(outputs)

    def _drop_waiting_too_long(self, seconds: float) -> None:
        for request_id in self.engine.requests_waiting_longer_than(seconds, time.time()):
            logger.warning("request %s waited more than %g s for a place in the batch (--max-queue-time); aborted",
                           request_id, seconds)
            self.engine.abort_request(request_id)
            if self._on_reject is not None:
                self._on_reject("queue_timeout")
            request = self._streams.pop(request_id, None)
            if request is not None:
                request.put(EngineOverloadedError(
                    f"server busy, please try again: the request waited more than {seconds:g} s to be scheduled",
                    "queue_timeout"))

    def _fail_requests(self, failures: dict[str, Exception]) -> None:
        for request_id, error in failures.items():
            logger.error("request %s failed and was aborted", request_id, exc_info=error)
            request = self._streams.pop(request_id, None)
            if request is not None:
                request.put(RequestFailedError("the engine failed while making this request's output", error))

    def _die(self, error: BaseException) -> None:
        # a rank failure is the server's fault but names no internals: clients may see which rank
        dead = EngineDeadError(f"the engine has stopped: {error}" if isinstance(error, RankFailedError)
                               else "the engine has stopped")
        with self._inbox_lock:
            self.death = error
        self._fail_pending(dead)
        for request in self._streams.values():
            request.put(dead)
        self._streams.clear()
        if self._on_dead is not None:
            self._on_dead(error)

    def _fail_pending(self, error: EngineDeadError) -> None:
        """Requests and calls queued as the loop stopped get an answer, not a wait forever."""
        with self._inbox_lock:
            while True:
                try:
                    command = self._inbox.get_nowait()
                except queue.Empty:
                    break
                if isinstance(command, _Call):
                    command.future.set_exception(error)
                elif isinstance(command, _Add):
                    command.put(error)

    def _report(self, outputs: list[RequestOutput]) -> None:
        if self._on_step is not None:
            self._on_step(self.engine.stats(), outputs, self.engine_index)

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
        except Exception as error:   # noqa: BLE001 - a fault with this request fails it alone
            logger.error("request %s could not be queued", command.request.request_id, exc_info=error)
            self.engine.abort_request(command.request.request_id)
            command.put(RequestFailedError("the engine could not queue this request", error))
            return
        self._streams[command.request.request_id] = command
        command.put(ACCEPTED)

    def _fail_all(self, error: BaseException) -> None:
        request_ids = list(self._streams)
        self.engine.abort_request(request_ids)
        for request_id in request_ids:
            self._streams.pop(request_id).put(error)
