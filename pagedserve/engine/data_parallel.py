"""Data parallel serving, the API process's side: K replica processes (engine/replica.py), each with its own
KV cache and its share of the cores, behind one EngineClient.

The API process keeps the InputProcessor (tokenizer, templates, checks, grammar compiles); a checked
`EngineRequest` goes to the replica the Router picks, and its outputs come back on the same `RequestStream`
a single engine gives, so no caller changes. Each replica's pipe has a writer thread (the event loop never
blocks on a pipe) and a reader thread, which hands each request's items to its stream, and each step's stats
to the metrics hook with the replica's index.

A replica that dies (killed, or its loop failed) fails its requests with EngineDeadError and the whole
engine reports itself dead (`on_dead`), as one engine's dying loop does: the server answers 5xx on /health
and exits non-zero.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import logging
import multiprocessing
import queue
import threading
import time
from collections import OrderedDict
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from typing import Any, Callable

from pagedserve.config import EngineConfig
from pagedserve.engine.async_engine import (DeathHook, EngineDeadError, OutputSink, RejectHook, RequestStream,
                                            StepHook, asyncio_sink)
from pagedserve.engine.llm_engine import EngineStats, ModelInfo
from pagedserve.engine.processor import EngineRequest
from pagedserve.engine.replica import (GRAMMAR_CACHE_SIZE, AbortRequest, AddRequest, CallEngine, CallResult,
                                       ReplicaDied, ReplicaFailed, ReplicaInfo, StepReport, StopReplica, run_replica)
from pagedserve.engine.router import Router
from pagedserve.executor import RankFailedError
from pagedserve.executor.cores import rank_config
from pagedserve.outputs import RequestOutput

logger = logging.getLogger(__name__)

# How long a replica may take to stop once told (it finishes its step first).
_STOP_TIMEOUT_SECONDS = 10.0
# A replica reports after every step and about once a second when idle; one silent for longer than
# --distributed-timeout-seconds (default this) is hung, and is killed so that the engine fails loudly.
DEFAULT_HANG_TIMEOUT_SECONDS = 300.0


def _replica_main(index: int, config: EngineConfig, conn: Connection, log_level: int,
                  max_queue_time: float | None) -> None:
    raise SystemExit(run_replica(index, config, conn, log_level, max_queue_time))


class SerializedGrammars:
    """Each compiled grammar serialized once for all the replicas that need it (their writer threads share it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._texts: OrderedDict[Any, str] = OrderedDict()

    def get(self, key: Any, grammar: Any) -> str:
        with self._lock:
            text = self._texts.get(key)
            if text is None:
                text = self._texts[key] = str(grammar.serialize_json())
                if len(self._texts) > GRAMMAR_CACHE_SIZE:
                    self._texts.popitem(last=False)
            self._texts.move_to_end(key)
            return text


class ReplicaProcess:
    """One replica as the API process sees it: its process, its pipe, and the requests it serves."""

    def __init__(self, index: int, config: EngineConfig, max_queue_time: float | None) -> None:
        self.index = index
        context = multiprocessing.get_context("spawn")
        self.conn, child_conn = context.Pipe()
        level = logging.getLogger("pagedserve").getEffectiveLevel()
        # NOTE: daemonic, so an API process that exits takes its replicas with it; a replica also stops
        # when its pipe closes (the API process was killed).
        self.process: BaseProcess = context.Process(
            target=_replica_main, args=(index, config, child_conn, level, max_queue_time),
            name=f"pagedserve-replica-{index}", daemon=True)
        self.process.start()
        child_conn.close()
        self.info: ReplicaInfo | None = None
        self.stats: EngineStats | None = None
        self.last_report = time.monotonic()
        self.sinks: dict[str, OutputSink] = {}          # request id -> where its items go
        self.calls: dict[int, concurrent.futures.Future] = {}
        self._outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._is_writing = False   # the writer thread runs (else messages go straight to the pipe)
        self._sent_grammars: OrderedDict[Any, None] = OrderedDict()   # spec keys, as the replica caches them
        self.serialized_grammars = SerializedGrammars()   # DataParallelEngine shares one among its replicas

    def wait_ready(self) -> ReplicaInfo:
        """Block until the replica loaded its model; RuntimeError naming why if it could not."""
        while not self.conn.poll(1.0):
            if not self.process.is_alive():
                raise RuntimeError(f"data parallel replica {self.index} exited with status "
                                   f"{self.process.exitcode} while loading the model")
        try:
            message = self.conn.recv()
        except (EOFError, OSError):
            self.process.join(5.0)
            raise RuntimeError(f"data parallel replica {self.index} exited with status {self.process.exitcode} "
                               "while loading the model") from None
        if isinstance(message, ReplicaFailed):
            raise RuntimeError(f"data parallel replica {self.index} failed to load the model: {message.error}")
        assert isinstance(message, ReplicaInfo), f"unexpected first message {message!r}"
        self.info = message
        return message

    def start_threads(self, on_message: Callable[[ReplicaProcess, Any], None],
                      on_closed: Callable[[ReplicaProcess], None]) -> None:
        def read() -> None:
            while True:
                try:
                    message = self.conn.recv()
                except (EOFError, OSError):
                    on_closed(self)
                    return
                try:
                    on_message(self, message)
                except RuntimeError as error:   # an event loop already closed (the server is stopping)
                    logger.debug("replica %d: an output found no event loop: %s", self.index, error)

        def write() -> None:
            while (message := self._outbox.get()) is not None:
                if isinstance(message, AddRequest) and message.request.grammar is not None:
                    message = self._with_grammar_sent(message.request)
                try:
                    self.conn.send(message)
                except (OSError, ValueError):   # the replica is gone: the reader reports it
                    return

        self._is_writing = True
        threading.Thread(target=read, name=f"pagedserve-replica-{self.index}-reader", daemon=True).start()
        threading.Thread(target=write, name=f"pagedserve-replica-{self.index}-writer", daemon=True).start()

    def send(self, message: Any) -> None:
        self._outbox.put(message)

    def _with_grammar_sent(self, request: EngineRequest) -> AddRequest:
        """(The writer thread) the request with its grammar as its key, serialized if this replica lacks it.

        NOTE: on this thread, since serializing a grammar takes about 0.1 s (it holds per-token masks)."""
        spec = request.params.structured_outputs
        assert spec is not None, "a grammar without its spec"
        key = spec.key
        without = dataclasses.replace(request, grammar=None)
        if key in self._sent_grammars:
            self._sent_grammars.move_to_end(key)
            return AddRequest(without, key)
        self._sent_grammars[key] = None
        if len(self._sent_grammars) > GRAMMAR_CACHE_SIZE:
            self._sent_grammars.popitem(last=False)
        return AddRequest(without, key, self.serialized_grammars.get(key, request.grammar))

    def stop(self, timeout: float) -> None:
        self.request_stop()
        self.join(timeout)

    def request_stop(self) -> None:
        if self._is_writing:
            self._outbox.put(StopReplica())
            self._outbox.put(None)
        else:   # start-up failed elsewhere: this replica may still be loading, and reads it once loaded
            try:
                self.conn.send(StopReplica())
            except (OSError, ValueError):
                pass

    def join(self, timeout: float) -> None:
        self.process.join(timeout)
        if self.process.is_alive():
            logger.warning("data parallel replica %d did not stop in %.0f s; killed", self.index, timeout)
            self.process.kill()
            self.process.join()

    def describe_exit(self) -> str:
        self.process.join(5.0)
        code = self.process.exitcode
        how = "is still running" if code is None else f"exited with status {code}" if code >= 0 \
            else f"was killed by signal {-code}"
        return f"data parallel replica {self.index} (pid {self.process.pid}) {how}"


class DataParallelEngine:
    """K replicas as one engine core: what EngineClient drives (add_request, abort, stats, shutdown)."""

    def __init__(self, config: EngineConfig, on_step: StepHook | None = None, on_dead: DeathHook | None = None,
                 max_queue_time: float | None = None, on_reject: RejectHook | None = None) -> None:
        """Start `config.data_parallel_size` replicas and wait for each to load (blocking: call it off the
        event loop). RuntimeError naming the replica if one cannot."""
        num_replicas = config.data_parallel_size
        self._on_step = on_step
        self._on_dead = on_dead
        self._on_reject = on_reject
        self._is_stopping = False
        self.death: BaseException | None = None
        self._lock = threading.Lock()
        self._call_ids = itertools.count()
        self.replicas: list[ReplicaProcess] = []
        try:
            for index in range(num_replicas):
                # each replica its share of the cores, pinned, as the ranks of a parallel model get theirs
                replica_config = rank_config(config, index, num_replicas).replace(data_parallel_size=1)
                self.replicas.append(ReplicaProcess(index, replica_config, max_queue_time))
            infos = [replica.wait_ready() for replica in self.replicas]
        except BaseException:
            self._is_stopping = True
            for replica in self.replicas:
                replica.stop(_STOP_TIMEOUT_SECONDS)
            raise
        for info, replica in zip(infos, self.replicas):
            logger.info("data parallel replica %d of %d: pid %d, %d threads on cores %s, %d KV blocks", replica.index,
                        num_replicas, info.pid, info.num_threads, info.cores or "(not pinned)", info.num_blocks)
        first = infos[0]
        # NOTE: every replica checks the same model; one whose KV cache came out smaller may have lowered its
        # context, and a request must fit any replica.
        self.limits = dataclasses.replace(first.limits, max_model_len=min(info.limits.max_model_len for info in infos))
        self.tokenizer = first.tokenizer
        self.generation_config = first.generation_config
        self.model_info: ModelInfo = dataclasses.replace(
            first.model_info, max_model_len=self.limits.max_model_len,
            weight_bytes=sum(info.model_info.weight_bytes for info in infos),
            kv_cache_bytes=sum(info.model_info.kv_cache_bytes for info in infos))
        self.router = Router([info.num_blocks for info in infos], first.block_size)
        grammars = SerializedGrammars()
        for replica in self.replicas:
            replica.serialized_grammars = grammars
            replica.last_report = time.monotonic()
            replica.start_threads(self._on_message, self._on_closed)
        self._hang_timeout = float(config.distributed_timeout_seconds or DEFAULT_HANG_TIMEOUT_SECONDS)
        threading.Thread(target=self._watch, name="pagedserve-replica-watchdog", daemon=True).start()

    # ---- what EngineClient asks -----------------------------------------------------------------

    @property
    def is_running(self) -> bool:
        return not self._is_stopping and self.death is None

    @property
    def num_waiting(self) -> int:
        return sum(replica.stats.num_waiting for replica in self.replicas if replica.stats is not None)

    def stats(self) -> EngineStats:
        """The replicas' stats summed (as of each one's last step)."""
        known = [replica.stats for replica in self.replicas if replica.stats is not None]
        if not known:
            return EngineStats(0, 0, 0.0, 0, 0, 0, 0, 0, 0, 0)
        num_blocks = sum(stats.num_blocks for stats in known)
        num_free = sum(stats.num_free_blocks for stats in known)
        return EngineStats(
            num_running=sum(stats.num_running for stats in known), num_waiting=sum(stats.num_waiting for stats in known),
            kv_cache_usage=(num_blocks - num_free) / num_blocks if num_blocks else 0.0,
            num_prompt_tokens=sum(stats.num_prompt_tokens for stats in known),
            num_generation_tokens=sum(stats.num_generation_tokens for stats in known),
            num_prefix_cache_queries=sum(stats.num_prefix_cache_queries for stats in known),
            num_prefix_cache_hits=sum(stats.num_prefix_cache_hits for stats in known),
            num_preemptions=sum(stats.num_preemptions for stats in known), num_free_blocks=num_free,
            num_blocks=num_blocks)

    async def add_request(self, request: EngineRequest) -> RequestStream:
        """Route a checked request to a replica; its stream once the replica queued it. Raises ValueError
        (nothing queued) if the replica refuses it, EngineDeadError if the engine is dead."""
        queue_: asyncio.Queue = asyncio.Queue()
        sink = asyncio_sink(queue_)
        load = 1 if request.pooling is not None else request.params.n
        with self._lock:
            if not self.is_running:
                raise EngineDeadError("the engine is not running")
            index = self.router.route(request.request_id, request.prompt_token_ids, load)
            replica = self.replicas[index]
            replica.sinks[request.request_id] = sink
        replica.send(AddRequest(request))
        try:
            first = await queue_.get()
        except asyncio.CancelledError:   # the caller went away while the replica queued it
            self.abort(request.request_id)
            raise
        if isinstance(first, BaseException):
            self._forget(replica, request.request_id)
            raise first
        return RequestStream(request, queue_, self.abort, index)

    def abort(self, request_id: str) -> None:
        """Stop a request on the replica serving it (its KV blocks are freed there at the next step)."""
        index = self.router.replica_of(request_id)
        if index is None:
            return
        replica = self.replicas[index]
        self._forget(replica, request_id)
        replica.send(AbortRequest(request_id))

    async def call_engine(self, method: str, *args: Any) -> Any:
        """`engine.method(*args)` on every replica; the first one's result, or the first error."""
        futures = []
        with self._lock:
            if not self.is_running:
                raise EngineDeadError("the engine is not running")
            for replica in self.replicas:
                call_id = next(self._call_ids)
                future: concurrent.futures.Future = concurrent.futures.Future()
                replica.calls[call_id] = future
                futures.append(asyncio.wrap_future(future))
                replica.send(CallEngine(call_id, method, args))
        results = await asyncio.gather(*futures, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return results[0]

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop every replica (each fails its open streams with "shutting down" first)."""
        with self._lock:
            self._is_stopping = True
        for replica in self.replicas:   # all at once: each finishes its step
            replica.request_stop()
        for replica in self.replicas:
            replica.join(timeout)
        self._fail_replica_requests(EngineDeadError("the server is shutting down"))

    # ---- from the replicas (their reader threads) -----------------------------------------------

    def _on_message(self, replica: ReplicaProcess, message: Any) -> None:
        if isinstance(message, StepReport):
            self._deliver(replica, message)
        elif isinstance(message, CallResult):
            future = replica.calls.pop(message.call_id, None)
            if future is not None:
                if message.error is not None:
                    future.set_exception(message.error)
                else:
                    future.set_result(message.result)
        elif isinstance(message, ReplicaDied):
            self._replica_died(replica, f"data parallel replica {replica.index}'s engine loop died: {message.error}")

    def _deliver(self, replica: ReplicaProcess, report: StepReport) -> None:
        replica.stats = report.stats
        replica.last_report = time.monotonic()
        outputs: list[RequestOutput] = []
        for request_id, item in report.items:
            sink = replica.sinks.get(request_id)
            if isinstance(item, RequestOutput):
                outputs.append(item)
            ends = isinstance(item, BaseException) or (isinstance(item, RequestOutput) and item.finished)
            if ends:
                self._forget(replica, request_id)
            if sink is not None:
                sink(item)
        if self._on_reject is not None:
            for reason in report.rejections:
                self._on_reject(reason)
        if self._on_step is not None:
            self._on_step(report.stats, outputs, replica.index)

    def _watch(self) -> None:
        """Kill a replica that stopped reporting (hung): its pipe closes, and the dead-replica path follows."""
        while self.is_running:
            time.sleep(min(self._hang_timeout / 4, 5.0))
            for replica in self.replicas:
                silent = time.monotonic() - replica.last_report
                if silent > self._hang_timeout and self.is_running and replica.process.is_alive():
                    reason = (f"data parallel replica {replica.index} (pid {replica.process.pid}) sent nothing for "
                              f"{silent:.0f} s (--distributed-timeout-seconds {self._hang_timeout:g}); killed")
                    self._replica_died(replica, reason)
                    replica.process.kill()

    def _on_closed(self, replica: ReplicaProcess) -> None:
        if not self._is_stopping:
            self._replica_died(replica, replica.describe_exit())

    def _replica_died(self, replica: ReplicaProcess, reason: str) -> None:
        with self._lock:
            if self.death is not None or self._is_stopping:
                return
            error = RankFailedError(reason)
            self.death = error
        logger.critical("%s; every request on it fails and the engine stops", reason)
        dead = EngineDeadError(f"the engine has stopped: {reason}")
        self._fail_replica_requests(dead, replica)
        if self._on_dead is not None:
            self._on_dead(error)

    def _fail_replica_requests(self, error: EngineDeadError, only: ReplicaProcess | None = None) -> None:
        for replica in self.replicas if only is None else [only]:
            with self._lock:
                sinks, replica.sinks = replica.sinks, {}
                calls, replica.calls = replica.calls, {}
            for request_id, sink in sinks.items():
                self.router.release(request_id)
                sink(error)
            for future in calls.values():
                if not future.done():
                    future.set_exception(error)

    def _forget(self, replica: ReplicaProcess, request_id: str) -> None:
        with self._lock:
            replica.sinks.pop(request_id, None)
        self.router.release(request_id)

