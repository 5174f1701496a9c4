"""GPT-2 (and DialoGPT, which is GPT-2 weights): learned absolute positions, pre-norm LayerNorm blocks
with biases, tanh-GELU MLP, fused c_attn, output head tied to the token embedding.

GPT-2 checkpoints store their projections as Conv1D, i.e. [in_features, out_features]; they are
transposed as they load. Follows transformers' modeling_gpt2.py (scale 1/sqrt(head_dim)).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.config import ModelConfig
from pagedserve.layers.attention import Attention
from pagedserve.layers.linear import Linear, VocabEmbedding
from pagedserve.layers.norm import LayerNorm
from pagedserve.layers.quant import PackedWeight
from pagedserve.models.causal_lm import CausalLM

_ACTIVATIONS = {"gelu_new": "tanh", "gelu_pytorch_tanh": "tanh", "gelu": "none"}


class Conv1DLinear(Linear):
    """A Linear whose checkpoint weight is [in_features, out_features] (transformers' Conv1D)."""

    def _load_shard(self, param: nn.Parameter, loaded: torch.Tensor | PackedWeight, shard_id: str | None = None) -> None:
        if isinstance(loaded, PackedWeight):
            raise ValueError("GPT-2 projections load from float checkpoints only")
        super()._load_shard(param, loaded.t(), shard_id)


class GPT2Attention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        size = config.hidden_size
        self.c_attn = Conv1DLinear(size, 3 * size, bias=True)
        self.c_proj = Conv1DLinear(size, size, bias=True)
        self.attn = Attention(config.num_attention_heads, config.num_attention_heads, config.head_dim,
                              scale=config.head_dim ** -0.5)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        q, k, v = self.c_attn(hidden_states).chunk(3, dim=-1)        # [num_tokens, hidden_size] each
        return self.c_proj(self.attn(q.contiguous(), k.contiguous(), v.contiguous()))


class GPT2MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"GPT-2 with activation {config.hidden_act!r} is not supported "
                             f"(only {', '.join(_ACTIVATIONS)})")
        self.approximate = _ACTIVATIONS[config.hidden_act]
        self.c_fc = Conv1DLinear(config.hidden_size, config.intermediate_size, bias=True)
        self.c_proj = Conv1DLinear(config.intermediate_size, config.hidden_size, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.gelu(self.c_fc(x), approximate=self.approximate))


class GPT2Block(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.ln_1 = LayerNorm(config.hidden_size, config.rms_norm_eps)
        self.attn = GPT2Attention(config)
        self.ln_2 = LayerNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = GPT2MLP(config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        hidden_states = hidden_states + self.attn(self.ln_1(hidden_states))
        return hidden_states + self.mlp(self.ln_2(hidden_states))


class GPT2Model(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.wte = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.wpe = VocabEmbedding(config.max_position_embeddings, config.hidden_size)
        self.h = nn.ModuleList(GPT2Block(config) for _ in range(config.num_hidden_layers))
        self.ln_f = LayerNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states = self.wte(input_ids) + self.wpe(positions)       # [num_tokens, hidden_size]
        for block in self.h:
            hidden_states = block(hidden_states)
        return self.ln_f(hidden_states)


class GPT2LMHeadModel(CausalLM):
    # GPT2LMHeadModel saves the stack as transformer.*, GPT2Model (the original gpt2 repo) without a prefix.
    checkpoint_prefixes = {"transformer.": "model.", "wte.": "model.wte.", "wpe.": "model.wpe.", "h.": "model.h.",
                           "ln_f.": "model.ln_f."}
    # the causal-mask buffers older checkpoints saved beside the weights
    ignored_checkpoint_suffixes = (".attn.bias", ".attn.masked_bias")

    def __init__(self, config: ModelConfig) -> None:
        model = GPT2Model(config)
        super().__init__(config, model, model.wte)
