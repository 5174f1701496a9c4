"""Model registry: a plain dict keyed by Hugging Face architecture name."""
from __future__ import annotations

from torch import nn

from pagedserve.config import ModelConfig
from pagedserve.models.gemma3 import Gemma3ForCausalLM, Gemma3ForConditionalGeneration
from pagedserve.models.llama import LlamaForCausalLM

MODEL_REGISTRY: dict[str, type[nn.Module]] = {
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Gemma3ForConditionalGeneration": Gemma3ForConditionalGeneration,
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}


def model_class(config: ModelConfig) -> type[nn.Module]:
    if config.architecture not in MODEL_REGISTRY:
        raise ValueError(f"unsupported model architecture {config.architecture!r}; "
                         f"supported: {', '.join(sorted(MODEL_REGISTRY))}")
    return MODEL_REGISTRY[config.architecture]
