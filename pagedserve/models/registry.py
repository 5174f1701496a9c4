"""Model registry: a plain dict keyed by Hugging Face architecture name."""
from __future__ import annotations

from typing import Callable

from torch import nn

from pagedserve.config import ModelConfig
from pagedserve.models.bert import BertModel
from pagedserve.models.causal_lm import CausalLM
from pagedserve.models.deepseek import DeepseekForCausalLM
from pagedserve.models.gemma3 import Gemma3ForCausalLM, Gemma3ForConditionalGeneration
from pagedserve.models.gpt2 import GPT2LMHeadModel
from pagedserve.models.granite import GraniteForCausalLM
from pagedserve.models.llama import LlamaForCausalLM
from pagedserve.models.mixtral import MixtralForCausalLM
from pagedserve.models.qwen_moe import Qwen2MoeForCausalLM, Qwen3MoeForCausalLM
from pagedserve.models.phi3 import Phi3ForCausalLM

# Each entry builds the model from its config: MODEL_REGISTRY[architecture](model_config).
MODEL_REGISTRY: dict[str, Callable[[ModelConfig], CausalLM]] = {
    "DeepseekV2ForCausalLM": DeepseekForCausalLM,
    "DeepseekV3ForCausalLM": DeepseekForCausalLM,
    "Gemma3ForCausalLM": Gemma3ForCausalLM,
    "Gemma3ForConditionalGeneration": Gemma3ForConditionalGeneration,
    "GPT2LMHeadModel": GPT2LMHeadModel,
    "GraniteForCausalLM": GraniteForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "MixtralForCausalLM": MixtralForCausalLM,
    "Phi3ForCausalLM": Phi3ForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen2MoeForCausalLM": Qwen2MoeForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "Qwen3MoeForCausalLM": Qwen3MoeForCausalLM,
}


# Encoders: no output head, only ever pooled into embeddings.
ENCODER_REGISTRY: dict[str, Callable[[ModelConfig], nn.Module]] = {
    "BertModel": BertModel,
    "RobertaModel": BertModel,
    "XLMRobertaModel": BertModel,
}


def model_class(config: ModelConfig) -> Callable[[ModelConfig], nn.Module]:
    registry: dict[str, Callable[[ModelConfig], nn.Module]] = {**MODEL_REGISTRY, **ENCODER_REGISTRY}
    if config.architecture not in registry:
        raise ValueError(f"unsupported model architecture {config.architecture!r}; "
                         f"supported: {', '.join(sorted(registry))}")
    return registry[config.architecture]
