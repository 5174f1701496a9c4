"""The whole model in the engine's process: one rank, no communication."""
from __future__ import annotations

from pagedserve.config import EngineConfig
from pagedserve.config.pooler import PoolerConfig
from pagedserve.engine.model_runner import ModelRunner, ModelRunnerOutput
from pagedserve.engine.platform import Platform
from pagedserve.engine.scheduler import SchedulerOutput
from pagedserve.layers.sampler import SamplingRow
from pagedserve.loader.checkpoint import Checkpoint


class UniprocExecutor:
    def __init__(self, config: EngineConfig, checkpoint: Checkpoint, is_quantized: bool,
                 pooler_config: PoolerConfig | None = None) -> None:
        self.platform = Platform.resolve(config, checkpoint.model_config.checkpoint_dtype, is_quantized)
        self.driver = ModelRunner(checkpoint.model_config, self.platform,
                                  checkpoint.weights(packed=self.platform.use_cpu_kernels), config.seed,
                                  pooler_config=pooler_config)
        self.max_concurrent_batches = 1

    def kv_bytes_per_block(self, block_size: int) -> int:
        return self.driver.kv_bytes_per_block(block_size)

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        self.driver.allocate_kv_cache(num_blocks, block_size)

    def execute_model(self, scheduler_output: SchedulerOutput, rows_of: dict[int, SamplingRow]) -> ModelRunnerOutput:
        return self.driver.execute(scheduler_output, rows_of)

    def start_step(self, scheduler_output: SchedulerOutput, rows_of: dict[int, SamplingRow]) -> FinishedStep:
        return FinishedStep(self.execute_model(scheduler_output, rows_of))

    def shutdown(self) -> None:
        """Nothing runs outside this process."""


class FinishedStep:
    """A step that ran to the end when it started (one rank has nothing to overlap)."""

    def __init__(self, output: ModelRunnerOutput) -> None:
        self.output = output

    def result(self) -> ModelRunnerOutput:
        return self.output
