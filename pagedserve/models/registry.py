"""Model registry: a plain dict keyed by Hugging Face architecture name."""
from __future__ import annotations

from typing import Callable

from pagedserve.config import ModelConfig
from pagedserve.models.causal_lm import CausalLM
from pagedserve.models.deepseek import DeepseekForCausalLM
from pagedserve.models.gemma3 import Gemma3ForCausalLM, Gemma3ForConditionalGeneration
from pagedserve.models.llama import LlamaForCausalLM
from pagedserve.models.mixtral import MixtralForCausalLM
from pagedserve.models.qwen_moe import Qwen2MoeForCausalLM, Qwen3MoeForCausalLM

# Each entry builds the model from its config: MODEL_REGISTRY[architecture](model_config).
MODEL_REGISTRY: dict[str, Callable[[ModelConfig], CausalLM]] = {
    "DeepseekV2ForCausalLM": DeepseekForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Gemma3ForConditionalGeneration": Gemma3ForConditionalGeneration,
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
}


def model_class(config: ModelConfig) -> Callable[[ModelConfig], CausalLM]:
    if config.architecture not in MODEL_REGISTRY:
        raise ValueError(f"unsupported model architecture {config.architecture!r}; "
                         f"supported: {', '.join(sorted(MODEL_REGISTRY))}")
    return MODEL_REGISTRY[config.architecture]
