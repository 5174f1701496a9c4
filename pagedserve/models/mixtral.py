"""Mixtral and the MoE decoder stack it shares with Qwen2-MoE / Qwen3-MoE (models/qwen_moe.py) and
DeepSeek (models/deepseek.py, with its latent attention).

The attention is the Llama family's (GQA, rotary; qkv bias for Qwen2-MoE, q/k norms for Qwen3-MoE);
the MLP of each layer is either routed (layers/moe.py: experts run only on their tokens) or dense,
as the config's `sparse_layers` says. No fused C++ decode layer: its MLP is a single dense one.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from pagedserve.config import ModelConfig
from pagedserve.layers.linear import VocabEmbedding
from pagedserve.layers.moe import SparseMoeBlock
from pagedserve.layers.norm import RMSNorm
from pagedserve.layers.rotary import RotaryEmbedding
from pagedserve.models.causal_lm import CausalLM
from pagedserve.models.llama import PACKED_MODULES, LlamaAttention, LlamaMLP, PreNormDecoderLayer


class MoEDecoderLayer(PreNormDecoderLayer):
    def __init__(self, config: ModelConfig, layer_index: int, self_attn: nn.Module) -> None:
        super().__init__()
        assert config.moe is not None, "an MoE layer needs the config's routing"
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = self_attn
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp: nn.Module = (SparseMoeBlock(config.hidden_size, config.hidden_act, config.moe)
                               if config.moe.sparse_layers[layer_index] else LlamaMLP(config))


class MoEModel(nn.Module):
    """embed -> MoE decoder layers -> norm. `attention(config, layer_index)` builds each layer's attention
    (Llama's here, DeepSeek's latent attention in models/deepseek.py), rotating `rotary_dim` dimensions."""

    def __init__(self, config: ModelConfig, attention: Callable[[ModelConfig, int], nn.Module] = LlamaAttention,
                 rotary_dim: int | None = None) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.rotary_emb = RotaryEmbedding(rotary_dim or config.head_dim, config.rope_theta, config.rope_scaling)
        self.layers = nn.ModuleList(MoEDecoderLayer(config, i, attention(config, i))
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)            # [num_tokens, hidden_size]
        cos_sin = self.rotary_emb(positions)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(cos_sin, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class MoEForCausalLM(CausalLM):
    """Qwen2-MoE / Qwen3-MoE checkpoint names (`mlp.gate`, `mlp.experts.<e>.gate_proj`, `mlp.shared_expert`)."""

    packed_modules = PACKED_MODULES

    def __init__(self, config: ModelConfig) -> None:
        model = MoEModel(config)
        super().__init__(config, model, model.embed_tokens)


class MixtralForCausalLM(MoEForCausalLM):
    # Mixtral's checkpoints name the MoE block and its experts' projections their own way.
    checkpoint_renames = {".block_sparse_moe.": ".mlp.", ".w1.": ".gate_proj.", ".w3.": ".up_proj.",
                          ".w2.": ".down_proj."}
