"""One rank: join the process groups, load this rank's shard, report where it runs, then run whatever the
driver broadcasts (a KV cache size, a step plan, or stop) until told to stop."""
from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

import psutil
import torch.distributed as dist

from pagedserve.config import EngineConfig
from pagedserve.distributed import ModelParallel, init_model_parallel
from pagedserve.engine.model_runner import ModelRunner, StepPlan
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
                                   spec.num_layers, spec.init_method, spec.timeout_seconds)
    platform, runner, error = None, None, None
    try:
        checkpoint = open_checkpoint(config)
        is_quantized = checkpoint.source.kind == "gguf" and checkpoint.model_config.checkpoint_dtype is None
        platform, runner = load_rank(config, checkpoint, is_quantized, parallel)
    except Exception as exc:   # reported to the driver, which fails start-up naming this rank
        error = f"{type(exc).__name__}: {exc}"
    dist.gather_object(describe_rank(spec.rank, spec.node_ip, platform, runner, error), dst=0)
    status = 1 if runner is None else _serve(runner)
    dist.destroy_process_group()
    return status


def _serve(runner: ModelRunner) -> int:
    while True:
        message = receive_from_driver()
        if isinstance(message, StepPlan):
            runner.run(message)
        elif isinstance(message, AllocateKVCache):
            runner.allocate_kv_cache(message.num_blocks, message.block_size)
        else:
            return 0


def receive_from_driver() -> StepPlan | AllocateKVCache | Shutdown:
    box: list[object] = [None]
    dist.broadcast_object_list(box, src=0)
    message = box[0]
    assert isinstance(message, (StepPlan, AllocateKVCache, Shutdown)), f"unexpected message {message!r}"
    return message


def send_to_workers(message: StepPlan | AllocateKVCache | Shutdown) -> None:
    """Every worker gets `message` once (rank 0 only)."""
    dist.broadcast_object_list([message], src=0)
