"""The driver of a multi-rank model: rank 0 in the engine's process. The other ranks are started by a
launcher (processes here, or Ray actors across nodes); from then on every rank speaks torch.distributed
(gloo on CPU, NCCL on CUDA by design): each step's plan is broadcast once, every rank runs its shard,
the hand-over between pipeline stages is a send/recv, and only this rank samples."""
from __future__ import annotations

import logging
import os
import queue
import socket
import threading
from dataclasses import dataclass
from typing import Callable, Protocol

import torch.distributed as dist

from pagedserve.config import EngineConfig
from pagedserve.engine.model_runner import ModelRunnerOutput, StartedStep, StepPlan, plan_step
from pagedserve.engine.scheduler import SchedulerOutput
from pagedserve.executor.cores import rank_config
from pagedserve.executor.errors import RankFailedError
from pagedserve.executor.worker import (AllocateKVCache, FinishStep, Message, RankInfo, Shutdown, StartStep, WorkerSpec,
                                        describe_rank, load_rank, send_to_worker, send_to_workers,
                                        use_interface_of)
from pagedserve.distributed import ModelParallel, init_model_parallel
from pagedserve.layers.sampler import SamplingRow
from pagedserve.loader.checkpoint import Checkpoint

logger = logging.getLogger(__name__)

# How long a collective (start-up included) may wait for the other ranks before it fails: a dead or hung
# worker becomes an error within this bound instead of a hang.
DEFAULT_TIMEOUT_SECONDS = 300.0

SpecFor = Callable[[int, int, int, str], WorkerSpec]   # (rank, local rank, ranks on its node, node ip) -> spec


class Launcher(Protocol):
    def driver_ip(self) -> str: ...

    def start(self, world_size: int, spec_for: SpecFor) -> int:
        """Start ranks 1..world_size-1; returns how many ranks (the driver's included) share its node."""
        ...

    def failures(self) -> list[str]:
        """One line per rank that has stopped, with how."""
        ...

    def stop(self, timeout_seconds: float) -> None: ...


class CollectiveExecutor:
    def __init__(self, config: EngineConfig, checkpoint: Checkpoint, is_quantized: bool, launcher: Launcher) -> None:
        if dist.is_initialized():
            raise ValueError("this process already runs a tensor- or pipeline-parallel model; serve one "
                             "parallel model per server")
        tp_size, pp_size = config.tensor_parallel_size, config.pipeline_parallel_size
        world_size = tp_size * pp_size
        timeout = float(config.distributed_timeout_seconds or DEFAULT_TIMEOUT_SECONDS)
        self.launcher = launcher
        self._is_shut_down = False
        driver_ip = launcher.driver_ip()
        init_method = f"tcp://{driver_ip}:{_free_port(driver_ip)}"
        num_layers = checkpoint.model_config.num_hidden_layers

        def spec_for(rank: int, local_rank: int, num_local_ranks: int, node_ip: str) -> WorkerSpec:
            return WorkerSpec(rank_config(config, local_rank, num_local_ranks), rank, init_method, num_layers,
                              node_ip, timeout)

        num_local = launcher.start(world_size, spec_for)
        own_config = rank_config(config, 0, num_local)
        self._sender: _Sender | None = None
        # NOTE: gloo reads the interface as the groups are made; put the variable back after, so it does not
        # leak into what this process starts later (another server, another cluster's ranks).
        chosen = os.environ.get("GLOO_SOCKET_IFNAME")
        use_interface_of(driver_ip)
        try:
            parallel = _join_watched(launcher, lambda: init_model_parallel(
                0, tp_size, pp_size, num_layers, init_method, timeout,
                use_shared_memory=not config.disable_custom_all_reduce))
        finally:
            if chosen is None:
                os.environ.pop("GLOO_SOCKET_IFNAME", None)
        self.parallel = parallel
        error = None
        try:
            self.platform, self.driver = load_rank(own_config, checkpoint, is_quantized, parallel)
        except Exception as exc:
            error = exc
        gathered: list[RankInfo | None] = [None] * world_size
        own_info = describe_rank(0, driver_ip, self.platform, self.driver, None) if error is None else \
            describe_rank(0, driver_ip, None, None, f"{type(error).__name__}: {error}")
        dist.gather_object(own_info, gathered, dst=0)
        infos = [info for info in gathered if info is not None]
        failed = [info for info in infos if info.error is not None]
        if error is not None or failed:
            self.shutdown()
            if error is not None:
                raise error
            raise RuntimeError("; ".join(f"rank {info.rank} on {info.node} failed to load: {info.error}"
                                         for info in failed))
        for info in infos:
            logger.info("rank %d of %d (tp %d, pp %d): node %s (%s), pid %d, %d threads on cores %s", info.rank,
                        world_size, info.rank % tp_size, info.rank // tp_size, info.node, info.node_ip, info.pid,
                        info.num_threads, _core_list(info.cores))
        self.ranks = infos
        self._kv_bytes_per_token = max(info.kv_bytes_per_token for info in infos)
        # Pipeline parallel keeps one batch in flight per stage (vLLM's virtual engines).
        self.max_concurrent_batches = pp_size
        self._sender = _Sender(parallel) if pp_size > 1 else None

    def kv_bytes_per_block(self, block_size: int) -> int:
        return self._kv_bytes_per_token * block_size

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        self._send(AllocateKVCache(num_blocks, block_size))
        self.driver.allocate_kv_cache(num_blocks, block_size)

    def execute_model(self, scheduler_output: SchedulerOutput, rows_of: dict[int, SamplingRow]) -> ModelRunnerOutput:
        return self.start_step(scheduler_output, rows_of).result()

    def start_step(self, scheduler_output: SchedulerOutput, rows_of: dict[int, SamplingRow]) -> PendingStep:
        """Send the step to the ranks and start it here; `.result()` finishes it. Up to
        `max_concurrent_batches` may be started before the oldest is finished (in order)."""
        plan = plan_step(scheduler_output)
        if self._sender is None:
            self._send(plan)
            return PendingStep(self, plan, scheduler_output, rows_of, None)
        self._send(StartStep(plan))
        try:
            started = self.driver.start(plan)
        except RuntimeError as error:
            raise self._worker_error(error) from error
        return PendingStep(self, plan, scheduler_output, rows_of, started)

    def _finish(self, pending: PendingStep) -> ModelRunnerOutput:
        try:
            if pending.started is None:
                logits = self.driver.run(pending.plan)
            else:
                self._send(FinishStep())
                logits = self.driver.finish(pending.started)
            return self.driver.sample(pending.plan, pending.scheduler_output, logits, pending.rows_of)
        except RuntimeError as error:
            raise self._worker_error(error) from error

    def shutdown(self) -> None:
        if self._is_shut_down:
            return
        self._is_shut_down = True
        try:
            if self._sender is not None:
                self._sender.stop(Shutdown())
            else:
                send_to_workers(self.parallel, Shutdown())
        except RuntimeError:
            pass   # a worker is gone already; the launcher stops the rest
        self.launcher.stop(timeout_seconds=30.0)
        dist.destroy_process_group()

    def _send(self, message: Message) -> None:
        try:
            if self._sender is not None:
                self._sender.send(message)
                return
            send_to_workers(self.parallel, message)
        except RuntimeError as error:
            raise self._worker_error(error) from error

    def _worker_error(self, error: RuntimeError) -> RankFailedError:
        failures = self.launcher.failures()
        detail = "; ".join(failures) if failures else str(error)
        return RankFailedError(f"a worker rank failed: {detail}")


@dataclass
class PendingStep:
    executor: CollectiveExecutor
    plan: StepPlan
    scheduler_output: SchedulerOutput
    rows_of: dict[int, SamplingRow]
    started: StartedStep | None

    def result(self) -> ModelRunnerOutput:
        return self.executor._finish(self)


class _Sender:
    """Sends the driver's messages to each worker from a thread of its own for that worker, in order.

    With batches in flight a later stage may be busy with the previous batch (or waiting to hand it to a
    first-stage rank) when the next message is sent: a send blocks until its worker takes it, so one
    worker's backlog must not hold up another's messages, nor the driver's own thread."""

    def __init__(self, parallel: ModelParallel) -> None:
        self.parallel = parallel
        self.error: BaseException | None = None
        self.outboxes: list[queue.SimpleQueue[Message | None]] = []
        self.threads: list[threading.Thread] = []
        for rank in range(1, parallel.world_size):
            outbox: queue.SimpleQueue[Message | None] = queue.SimpleQueue()
            thread = threading.Thread(target=self._run, args=(rank, outbox), name=f"pagedserve-send-rank-{rank}",
                                      daemon=True)
            thread.start()
            self.outboxes.append(outbox)
            self.threads.append(thread)

    def send(self, message: Message) -> None:
        if self.error is not None:
            raise RuntimeError(f"sending to the workers failed: {self.error}")
        for outbox in self.outboxes:
            outbox.put(message)

    def stop(self, last: Message) -> None:
        for outbox in self.outboxes:
            outbox.put(last)
            outbox.put(None)
        for thread in self.threads:
            thread.join(30.0)

    def _run(self, rank: int, outbox: queue.SimpleQueue[Message | None]) -> None:
        while (message := outbox.get()) is not None:
            try:
                send_to_worker(self.parallel, rank, message)
            except RuntimeError as error:
                self.error = error
                return


def _join_watched(launcher: Launcher, join: Callable[[], ModelParallel]) -> ModelParallel:
    """Meet the other ranks (`join` blocks until all arrive), failing at once if one of them stops first
    (a worker that cannot even start would otherwise keep the driver waiting for the whole timeout)."""
    joined: list[ModelParallel] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            joined.append(join())
        except BaseException as error:
            errors.append(error)

    # NOTE: daemonic: after a failure it may stay blocked in the rendezvous, and must not keep the process up.
    thread = threading.Thread(target=run, name="pagedserve-rendezvous", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.2)
        failures = launcher.failures()
        if failures and thread.is_alive():
            raise RuntimeError(f"a worker rank stopped before the ranks met: {'; '.join(failures)}")
    if errors:
        raise errors[0]
    return joined[0]


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _core_list(cores: tuple[int, ...]) -> str:
    return ",".join(map(str, cores))
