"""One data parallel replica: an engine-core process running the scheduler and the model (LLMEngine's step
loop, on AsyncEngine's thread) for the API process, which keeps the InputProcessor and routes requests.

The two speak plain messages over one pipe (multiprocessing, pickled): checked `EngineRequest`s, aborts and
named engine calls come in; once per step one `StepReport` goes out with the engine's stats and each
request's new items (ACCEPTED, RequestOutputs, or the error that ended it). Everything AsyncEngine does for
one process (queue-time limits, failing one request or a step's requests, the dying loop) happens here
unchanged; its outputs only take a pipe instead of an asyncio queue.

A replica ignores SIGINT and SIGTERM (the API process drains, then stops it) and ends when told or when its
pipe closes (the API process is gone).
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pickle
import signal
import threading
from collections import OrderedDict
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Callable

from pagedserve.config import EngineConfig
from pagedserve.engine.async_engine import AsyncEngine, EngineDeadError, OutputSink, RequestFailedError
from pagedserve.engine.llm_engine import EngineStats, LLMEngine, ModelInfo
from pagedserve.engine.processor import EngineRequest, ModelLimits
from pagedserve.sampling_params import SamplingParamsError

logger = logging.getLogger(__name__)


# ---- API process -> replica ---------------------------------------------------------------------

# Compiled grammars each replica keeps, by spec. NOTE: the API side's record of what it sent a replica and
# the replica's cache evict alike (same size, same order of use), so a grammar crosses the pipe once.
GRAMMAR_CACHE_SIZE = 64


@dataclass(frozen=True)
class AddRequest:
    """A checked request. Its compiled grammar (xgrammar's does not pickle) travels as its spec's key, with
    the grammar serialized the first time this replica gets that key."""

    request: EngineRequest
    grammar_key: Any = None
    grammar_json: str | None = None


@dataclass(frozen=True)
class AbortRequest:
    request_id: str


@dataclass(frozen=True)
class CallEngine:
    """`engine.method(*args)` between steps; answered by a CallResult with the same id."""

    call_id: int
    method: str
    args: tuple[Any, ...]


@dataclass(frozen=True)
class StopReplica:
    pass


# ---- replica -> API process ---------------------------------------------------------------------

@dataclass(frozen=True)
class ReplicaInfo:
    """What the API process needs of a loaded replica: its limits for the InputProcessor, the tokenizer and
    generation_config it checks and renders with, and its KV cache size (for the router)."""

    model_info: ModelInfo
    limits: ModelLimits
    generation_config: dict[str, Any]
    tokenizer: Any
    num_blocks: int
    block_size: int
    pid: int
    cores: str | None                # the cores it is pinned to, as --cpu-threads-bind lists them
    num_threads: int


@dataclass(frozen=True)
class ReplicaFailed:
    """The replica could not load the model."""

    error: str


@dataclass(frozen=True)
class StepReport:
    """After a step (or about once a second when idle): the engine's stats, the items for each request since
    the last report in order, and the reasons of the requests dropped for load."""

    stats: EngineStats
    items: list[tuple[str, object]]
    rejections: list[str]


@dataclass(frozen=True)
class CallResult:
    call_id: int
    result: Any = None
    error: BaseException | None = None


@dataclass(frozen=True)
class ReplicaDied:
    """The replica's step loop ended other than by StopReplica; every request on it failed."""

    error: str


FromReplica = ReplicaInfo | ReplicaFailed | StepReport | CallResult | ReplicaDied


def run_replica(index: int, config: EngineConfig, conn: Connection, log_level: int,
                max_queue_time: float | None) -> int:
    """The replica's whole life (the process's main); its exit status: 0 after StopReplica, 1 if the model
    failed to load or the loop died."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # the server's format (cli/main.py), each line saying which replica wrote it
    logging.basicConfig(level=log_level, format=f"%(levelname)s %(asctime)s replica {index} %(name)s: %(message)s",
                        datefmt="%m-%d %H:%M:%S")
    try:
        engine = LLMEngine(config)
    except Exception as error:   # noqa: BLE001 - reported to the API process, which fails start-up
        logger.error("replica %d failed to load the model", index, exc_info=error)
        conn.send(ReplicaFailed(f"{type(error).__name__}: {error}"))
        return 1
    conn.send(ReplicaInfo(engine.model_info(), engine.model_limits(), engine.generation_config, engine.tokenizer,
                          engine.block_manager.num_blocks, config.block_size, os.getpid(),
                          config.cpu_threads_bind, engine.platform.num_threads))
    outbox = _Outbox(conn, engine.stats)
    core = AsyncEngine(engine, on_step=outbox.report, on_dead=outbox.died, max_queue_time=max_queue_time,
                       on_reject=outbox.reject, engine_index=index)
    try:
        _serve(core, conn, outbox)
    finally:
        core.shutdown()
        outbox.flush()
    return 0 if core.death is None else 1


def _serve(core: AsyncEngine, conn: Connection, outbox: _Outbox) -> None:
    grammars = _Grammars(core.engine)
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):   # the API process is gone
            logger.warning("the API process closed the pipe; the replica stops")
            return
        if isinstance(message, AddRequest):
            request_id = message.request.request_id
            try:
                core.submit(grammars.attach(message), outbox.sink(request_id))
            except EngineDeadError as error:
                outbox.put(request_id, error)
            except Exception as error:   # noqa: BLE001 - a grammar that would not load fails its request alone
                logger.error("request %s: its grammar could not be loaded", request_id, exc_info=error)
                outbox.put(request_id, RequestFailedError("the engine could not queue this request", error))
        elif isinstance(message, AbortRequest):
            core.abort(message.request_id)
        elif isinstance(message, CallEngine):
            _call(core, message, outbox)
        else:
            return


class _Grammars:
    """The compiled grammars this replica was sent, by spec key (see GRAMMAR_CACHE_SIZE)."""

    def __init__(self, engine: LLMEngine) -> None:
        self._engine = engine
        self._tokenizer_info: Any = None
        self._cache: OrderedDict[Any, Any] = OrderedDict()

    def attach(self, message: AddRequest) -> EngineRequest:
        if message.grammar_key is None:
            return message.request
        key = message.grammar_key
        if message.grammar_json is not None:
            import xgrammar as xgr

            if self._tokenizer_info is None:   # as the API process's GrammarCompiler made it
                engine = self._engine
                self._tokenizer_info = xgr.TokenizerInfo.from_huggingface(
                    engine.tokenizer, vocab_size=engine.model_config.vocab_size,
                    stop_token_ids=sorted(engine.eos_token_ids))
            self._cache[key] = xgr.CompiledGrammar.deserialize_json(message.grammar_json, self._tokenizer_info)
            if len(self._cache) > GRAMMAR_CACHE_SIZE:
                self._cache.popitem(last=False)
        self._cache.move_to_end(key)
        return dataclasses.replace(message.request, grammar=self._cache[key])


def _call(core: AsyncEngine, message: CallEngine, outbox: _Outbox) -> None:
    def answer(future: Any) -> None:
        error = future.exception()
        outbox.send(CallResult(message.call_id, None if error else future.result(), _portable(error) if error else None))

    try:
        future = core.call_soon(lambda engine: getattr(engine, message.method)(*message.args))
    except EngineDeadError as error:
        outbox.send(CallResult(message.call_id, error=error))
        return
    future.add_done_callback(answer)


class _Outbox:
    """Items for the API process, held until the step's report (one pipe message per step, not per token)."""

    def __init__(self, conn: Connection, stats: Callable[[], EngineStats]) -> None:
        """`stats`: the engine's, read on the loop thread (or once it has ended)."""
        self._conn = conn
        self._stats = stats
        self._lock = threading.Lock()   # the loop thread and, for refusals, the pipe-reading thread add items
        self._items: list[tuple[str, object]] = []
        self._rejections: list[str] = []

    def sink(self, request_id: str) -> OutputSink:
        return lambda item: self.put(request_id, item)

    def put(self, request_id: str, item: object) -> None:
        if isinstance(item, BaseException):
            item = _portable(item)
        with self._lock:
            self._items.append((request_id, item))

    def reject(self, reason: str) -> None:
        with self._lock:
            self._rejections.append(reason)

    def report(self, stats: EngineStats, _outputs: list[Any], _engine_index: int) -> None:
        """AsyncEngine's step hook (the outputs are among the items already)."""
        self.flush(stats)

    def flush(self, stats: EngineStats | None = None) -> None:
        stats = stats or self._stats()
        with self._lock:
            items, self._items = self._items, []
            rejections, self._rejections = self._rejections, []
        self.send(StepReport(stats, items, rejections))

    def died(self, error: BaseException) -> None:
        """AsyncEngine's death hook: the requests' errors first, then why."""
        self.flush()
        self.send(ReplicaDied(f"{type(error).__name__}: {error}"))

    def send(self, message: FromReplica) -> None:
        try:
            with self._lock:
                self._conn.send(message)
        except (OSError, ValueError):   # the API process is gone; the pipe reader ends the replica
            pass


def _portable(error: BaseException) -> BaseException:
    """`error` as it can cross the pipe: itself if it pickles whole, else a ValueError (the client's fault)
    or RequestFailedError (ours) with its message."""
    try:
        pickle.loads(pickle.dumps(error))
        return error
    except Exception:   # noqa: BLE001 - an exception class whose constructor pickle cannot call
        if isinstance(error, ValueError):
            param = getattr(error, "param", None)
            return SamplingParamsError(param, str(error)) if isinstance(param, str) else ValueError(str(error))
        return RequestFailedError("the engine failed while running this request", error)

