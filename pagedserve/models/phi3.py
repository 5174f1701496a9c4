"""Phi-3 (and Phi-3.5-mini): the Llama layer, with q/k/v and gate/up already fused in the checkpoint
(`qkv_proj`, `gate_up_proj`), so its tensors load whole into our fused projections."""
from __future__ import annotations

from pagedserve.config import ModelConfig
from pagedserve.models.llama import LlamaForCausalLM


class Phi3ForCausalLM(LlamaForCausalLM):
    # NOTE: nothing to stack: the checkpoint's fused tensors have our layout (q | k | v, gate | up).
    packed_modules: dict[str, tuple[str, str]] = {}

    def __init__(self, config: ModelConfig) -> None:
        if config.partial_rotary_factor != 1.0:
            raise ValueError(f"Phi-3 with partial_rotary_factor {config.partial_rotary_factor} (Phi-4-mini) is not "
                             "supported: only fully rotary heads are")
        super().__init__(config)
