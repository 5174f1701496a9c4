"""One rank: join the process groups, load this rank's shard, report where it runs, then run whatever the
driver broadcasts (a KV cache size, a step plan, or stop) until told to stop."""
from __future__ import annotations

import logging
import os
import socket
from collections import deque
from dataclasses import dataclass

import psutil
import torch.distributed as dist

from pagedserve.config import EngineConfig
from pagedserve.distributed import ModelParallel, init_model_parallel
from pagedserve.engine.model_runner import ModelRunner, StartedStep, StepPlan
from pagedserve.engine.platform import Platform
from pagedserve.loader.checkpoint import Checkpoint, open_checkpoint

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerSpec:
    """What a rank needs to start: its engine config (its own threads and cores), where to meet the others."""

    config: EngineConfig
    rank: int
    init_method: str                 # tcp://driver-address:port
    num_layers: int
    node_ip: str                     # this rank's node address; gloo talks over the interface holding it
    timeout_seconds: float


@dataclass(frozen=True)
class RankInfo:
    """What each rank reports at start-up (rank 0 logs them all)."""

    rank: int
    node: str
    node_ip: str
    pid: int
    cores: tuple[int, ...]
    num_threads: int
    kv_bytes_per_token: int          # of this rank's KV cache
    error: str | None = None         # why it failed to load, if it did


@dataclass(frozen=True)
class AllocateKVCache:
    num_blocks: int
    block_size: int


@dataclass(frozen=True)
class Shutdown:
    """The driver is stopping: leave the loop."""


@dataclass(frozen=True)
class StartStep:
    """Pipeline parallel: run this batch's part (the first stage keeps it for FinishStep)."""

    plan: StepPlan


@dataclass(frozen=True)
class FinishStep:
    """Pipeline parallel: the first stage finishes its oldest started batch (the logits)."""


Message = StepPlan | AllocateKVCache | StartStep | FinishStep | Shutdown


def use_interface_of(node_ip: str) -> None:
    """Point gloo at the network interface that holds `node_ip` (unless the user chose one), so ranks on
    several hosts meet over it rather than over whatever the host name resolves to."""
    if "GLOO_SOCKET_IFNAME" in os.environ:
        return
    for name, addresses in psutil.net_if_addrs().items():
        if any(address.family == socket.AF_INET and address.address == node_ip for address in addresses):
            os.environ["GLOO_SOCKET_IFNAME"] = name
            return


def load_rank(config: EngineConfig, checkpoint: Checkpoint, is_quantized: bool, parallel: ModelParallel
              ) -> tuple[Platform, ModelRunner]:
    platform = Platform.resolve(config, checkpoint.model_config.checkpoint_dtype, is_quantized)
    runner = ModelRunner(checkpoint.model_config, platform, checkpoint.weights(packed=platform.use_cpu_kernels),
                         config.seed, parallel)
    return platform, runner


def describe_rank(rank: int, node_ip: str, platform: Platform | None, runner: ModelRunner | None,
                  error: str | None) -> RankInfo:
    cores = tuple(sorted(os.sched_getaffinity(0)))
    return RankInfo(rank, socket.gethostname(), node_ip, os.getpid(), cores,
                    platform.num_threads if platform else 0, runner.kv_bytes_per_block(1) if runner else 0, error)


def run_worker(spec: WorkerSpec) -> int:
    """The rank's whole life; returns its exit status (1: it failed to load)."""
    use_interface_of(spec.node_ip)
    config = spec.config
    parallel = init_model_parallel(spec.rank, config.tensor_parallel_size, config.pipeline_parallel_size,
                                   spec.num_layers, spec.init_method, spec.timeout_seconds,
                                   use_shared_memory=not config.disable_custom_all_reduce)
    platform, runner, error = None, None, None
    try:
        checkpoint = open_checkpoint(config)
        is_quantized = checkpoint.source.kind == "gguf" and checkpoint.model_config.checkpoint_dtype is None
        platform, runner = load_rank(config, checkpoint, is_quantized, parallel)
    except Exception as exc:   # reported to the driver, which fails start-up naming this rank
        error = f"{type(exc).__name__}: {exc}"
    dist.gather_object(describe_rank(spec.rank, spec.node_ip, platform, runner, error), dst=0)
    status = 1 if runner is None else _serve(runner, parallel)
    dist.destroy_process_group()
    return status


def _serve(runner: ModelRunner, parallel: ModelParallel) -> int:
    started: deque[StartedStep] = deque()
    is_first_stage = parallel.stage.is_first
    while True:
        message = receive_from_driver(parallel)
        if isinstance(message, StepPlan):
            runner.run(message)
        elif isinstance(message, StartStep):
            if is_first_stage:
                started.append(runner.start(message.plan))
            else:
                runner.run(message.plan)
        elif isinstance(message, FinishStep):
            if is_first_stage:
                runner.finish(started.popleft())
        elif isinstance(message, AllocateKVCache):
            runner.allocate_kv_cache(message.num_blocks, message.block_size)
        else:
            return 0


def receive_from_driver(parallel: ModelParallel) -> Message:
    box: list[object] = [None]
    if parallel.stage.size > 1:
        dist.recv_object_list(box, src=0, group=parallel.control_group)
    else:
        dist.broadcast_object_list(box, src=0, group=parallel.control_group)
    message = box[0]
    assert isinstance(message, (StepPlan, AllocateKVCache, StartStep, FinishStep, Shutdown)), \
        f"unexpected message {message!r}"
    return message


def send_to_workers(parallel: ModelParallel, message: Message) -> None:
    """Every worker gets `message` once (rank 0 only): one broadcast, when every rank runs each step in lockstep
    (no pipeline stages)."""
    dist.broadcast_object_list([message], src=0, group=parallel.control_group)


def send_to_worker(parallel: ModelParallel, rank: int, message: Message) -> None:
    """`message` to one worker (pipeline parallel).

    NOTE: with batches in flight a later stage may be busy with the previous batch when the next is sent; a
    broadcast (a tree in gloo) would then hold up the other ranks behind it while that stage waits for one of
    them, so pipeline-parallel messages go point to point, each worker's in its own order."""
    dist.send_object_list([message], dst=rank, group=parallel.control_group)
