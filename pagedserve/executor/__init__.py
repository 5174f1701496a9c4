"""How the engine runs a step on its model's ranks: one verb, `execute_model(scheduler_output)`.

`uni` runs the whole model in the engine's process (one rank, the default then). With more ranks
(tensor x pipeline parallel), rank 0 is the engine's own process, the driver: it schedules, sends each
step's plan to every worker once (a torch.distributed broadcast), runs its shard and samples; `mp` starts
the other ranks as processes on this machine (the default), `ray` as Ray actors placed by a placement
group across the cluster's nodes. Workers never see the scheduler.
"""
from __future__ import annotations

from typing import Protocol

from pagedserve.config import EngineConfig
from pagedserve.config.pooler import PoolerConfig
from pagedserve.engine.model_runner import ModelRunner, ModelRunnerOutput
from pagedserve.engine.platform import Platform
from pagedserve.engine.scheduler import SchedulerOutput
from pagedserve.models.parallel import check_parallel_fits
from pagedserve.executor.errors import RankFailedError
from pagedserve.layers.sampler import SamplingRow
from pagedserve.loader.checkpoint import Checkpoint

__all__ = ["Executor", "PendingOutput", "RankFailedError", "make_executor"]


class PendingOutput(Protocol):
    def result(self) -> ModelRunnerOutput: ...


class Executor(Protocol):
    platform: Platform
    driver: ModelRunner          # rank 0's runner, in this process: it samples
    max_concurrent_batches: int  # batches that may be in flight at once: the pipeline stages

    def kv_bytes_per_block(self, block_size: int) -> int:
        """The most bytes one KV block takes on any rank (each holds its layers' share of the heads)."""
        ...

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None: ...

    def execute_model(self, scheduler_output: SchedulerOutput,
                      rows_of: dict[int, SamplingRow]) -> ModelRunnerOutput:
        """Run one step on every rank; the driver's sampled tokens."""
        ...

    def start_step(self, scheduler_output: SchedulerOutput, rows_of: dict[int, SamplingRow]) -> PendingOutput:
        """execute_model in two halves, so that the next batch can start before this one's result."""
        ...

    def shutdown(self) -> None: ...


def make_executor(config: EngineConfig, checkpoint: Checkpoint, is_quantized: bool,
                  pooler_config: PoolerConfig | None = None) -> Executor:
    """`pooler_config`: the model is served for embeddings (one rank only)."""
    world_size = config.tensor_parallel_size * config.pipeline_parallel_size
    if pooler_config is not None and world_size > 1:
        raise ValueError(f"embedding models run on one rank; tensor_parallel_size {config.tensor_parallel_size} x "
                         f"pipeline_parallel_size {config.pipeline_parallel_size} = {world_size} is not supported")
    backend = config.distributed_executor_backend or ("mp" if world_size > 1 else "uni")
    if backend == "uni":
        if world_size > 1:
            raise ValueError(f"--distributed-executor-backend uni runs one rank, but tensor_parallel_size "
                             f"{config.tensor_parallel_size} x pipeline_parallel_size "
                             f"{config.pipeline_parallel_size} = {world_size}; use mp or ray")
        from pagedserve.executor.uniproc import UniprocExecutor

        return UniprocExecutor(config, checkpoint, is_quantized, pooler_config)
    check_parallel_fits(checkpoint.model_config, config.tensor_parallel_size, config.pipeline_parallel_size)
    from pagedserve.executor.collective import CollectiveExecutor

    if backend == "mp":
        from pagedserve.executor.multiproc import ProcessLauncher

        return CollectiveExecutor(config, checkpoint, is_quantized, ProcessLauncher())
    from pagedserve.executor.ray_launcher import RayLauncher

    return CollectiveExecutor(config, checkpoint, is_quantized, RayLauncher())
