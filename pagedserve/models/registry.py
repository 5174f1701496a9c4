"""Model registry: a plain dict keyed by Hugging Face architecture name."""
from __future__ import annotations

from typing import Callable

from pagedserve.config import ModelConfig
from pagedserve.models.causal_lm import CausalLM
from pagedserve.models.gemma3 import Gemma3ForCausalLM, Gemma3ForConditionalGeneration
from pagedserve.models.llama import LlamaForCausalLM

# Each entry builds the model from its config: MODEL_REGISTRY[architecture](model_config).
MODEL_REGISTRY: dict[str, Callable[[ModelConfig], CausalLM]] = {
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Gemma3ForConditionalGeneration": Gemma3ForConditionalGeneration,
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
}


def model_class(config: ModelConfig) -> Callable[[ModelConfig], CausalLM]:
    if config.architecture not in MODEL_REGISTRY:
        raise ValueError(f"unsupported model architecture {config.architecture!r}; "
                         f"supported: {', '.join(sorted(MODEL_REGISTRY))}")
    return MODEL_REGISTRY[config.architecture]
