"""Whether a model splits over the tensor- and pipeline-parallel ranks asked for: checked before any rank
starts, and again as each rank builds its shard."""
from __future__ import annotations

from pagedserve.config import ModelConfig
from pagedserve.models.registry import model_class


def check_parallel_fits(config: ModelConfig, tp_size: int, pp_size: int) -> None:
    """Raise ValueError naming the numbers when `tp_size` x `pp_size` ranks cannot split the model."""
    cls = model_class(config)
    if tp_size > 1 and not getattr(cls, "supports_tensor_parallel", False):
        raise ValueError(f"{config.architecture} has no tensor-parallel layers yet; use --tensor-parallel-size 1")
    if pp_size > 1 and not getattr(cls, "supports_pipeline_parallel", False):
        raise ValueError(f"{config.architecture} cannot be split into pipeline stages yet; use "
                         "--pipeline-parallel-size 1")
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    if heads % tp_size:
        raise ValueError(f"tensor_parallel_size {tp_size} does not divide the model's {heads} attention heads")
    if kv_heads % tp_size and tp_size % kv_heads:
        raise ValueError(f"tensor_parallel_size {tp_size} and the model's {kv_heads} key/value heads: one must "
                         "divide the other")
    if config.intermediate_size % tp_size:
        raise ValueError(f"tensor_parallel_size {tp_size} does not divide the model's intermediate size "
                         f"{config.intermediate_size}")
    if pp_size > config.num_hidden_layers:
        raise ValueError(f"pipeline_parallel_size {pp_size} is more than the model's {config.num_hidden_layers} "
                         "layers")
