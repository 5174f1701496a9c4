"""torch.distributed for the engine: which shard of the model a rank holds (tensor and pipeline parallel),
the process groups that join the ranks, and the collectives the parallel layers and the runner call."""
from pagedserve.distributed.parallel import (ModelParallel, PipelineStage, TensorParallel, current_model_parallel,
                                             init_model_parallel, model_parallel, split_layers)

__all__ = ["ModelParallel", "PipelineStage", "TensorParallel", "current_model_parallel", "init_model_parallel",
           "model_parallel", "split_layers"]
