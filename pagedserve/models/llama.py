"""The Llama family: Llama 2/3, SmolLM2, Mistral, Qwen2/2.5 (qkv bias) and Qwen3 (q/k norm)."""
from __future__ import annotations

import torch
from torch import nn

from pagedserve.config import ModelConfig
from pagedserve.layers.activation import gated_activation
from pagedserve.layers.attention import Attention
from pagedserve.layers.forward_context import get_forward_context, pipeline_inputs
from pagedserve.distributed import current_model_parallel
from pagedserve.layers.linear import VocabEmbedding
from pagedserve.layers.parallel_linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from pagedserve.layers.norm import RMSNorm
from pagedserve.layers.rotary import CosSin, RotaryEmbedding, apply_rotary
from pagedserve.models.causal_lm import CausalLM
from pagedserve.models.llama_fused import FusedDecodeLayer, fused_decode_layer


class LlamaAttention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        # this rank's heads (all of them on one rank)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias=config.attention_bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size)
        self.qk_norm = config.qk_norm
        if self.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps)
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, scale=self.head_dim ** -0.5,
                              sliding_window=config.sliding_windows[layer_index])

    def forward(self, cos_sin: CosSin, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden_states)                  # [num_tokens, q_size + 2 * kv_size]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        if self.qk_norm:
            q = self.q_norm(q.reshape(-1, self.head_dim)).view(q.shape[0], -1)
            k = self.k_norm(k.reshape(-1, self.head_dim)).view(k.shape[0], -1)
        q = apply_rotary(q, cos_sin, self.head_dim)
        k = apply_rotary(k, cos_sin, self.head_dim)
        return self.o_proj(self.attn(q, k, v.contiguous()))


class LlamaMLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        size = config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, {"gate": size, "up": size})
        self.down_proj = RowParallelLinear(size, config.hidden_size)
        self.act = gated_activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class PreNormDecoderLayer(nn.Module):
    """The pre-norm residual block Llama and its MoE relatives share: the residual stream runs beside the
    hidden states, each norm adding the previous block's output to it."""

    input_layernorm: RMSNorm
    self_attn: nn.Module
    post_attention_layernorm: RMSNorm
    mlp: nn.Module

    def forward(self, cos_sin: CosSin, hidden_states: torch.Tensor, residual: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(cos_sin, hidden_states)
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states), residual


class LlamaDecoderLayer(PreNormDecoderLayer):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = LlamaAttention(config, layer_index)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = LlamaMLP(config)
        self.fused_decode: FusedDecodeLayer | None = None   # set by the runner once weights are loaded

    def forward(self, cos_sin: CosSin, hidden_states: torch.Tensor, residual: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        context = get_forward_context()
        if self.fused_decode is not None and context.use_cpu_kernels and context.attn_metadata.is_decode_only \
                and context.lora is None:   # the fused C++ layer knows no adapters
            return self.fused_decode(cos_sin, hidden_states, residual, self.self_attn.attn)
        return super().forward(cos_sin, hidden_states, residual)


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        # Under pipeline parallelism this stage builds only its layers (the others stay placeholders, so
        # layer indices keep the checkpoint's numbering); the first stage embeds, the last one norms.
        self.stage = current_model_parallel().stage
        self.tp_size = current_model_parallel().tp.size
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size) if self.stage.is_first else None
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) if self.stage.holds(i) else nn.Identity()
                                    for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps) if self.stage.is_last else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The final hidden states [num_tokens, hidden_size]; on a stage before the last, its hidden states
        and residual stacked, [2, num_tokens, hidden_size], for the next stage."""
        cos_sin = self.rotary_emb(positions)
        if self.embed_tokens is not None:
            hidden_states, residual = self.embed_tokens(input_ids), None   # [num_tokens, hidden_size]
        else:
            hidden_states, residual = pipeline_inputs()
        for layer in self.layers[self.stage.start_layer:self.stage.end_layer]:
            hidden_states, residual = layer(cos_sin, hidden_states, residual)
        if self.norm is None:
            assert residual is not None, "every stage runs at least one layer"
            return torch.stack((hidden_states, residual))
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


# checkpoint module name -> (our fused module, shard); every family here fuses these projections.
PACKED_MODULES = {
    "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up"),
}


class LlamaForCausalLM(CausalLM):
    packed_modules = PACKED_MODULES
    supports_tensor_parallel = True
    supports_pipeline_parallel = True

    def __init__(self, config: ModelConfig) -> None:
        model = LlamaModel(config)
        super().__init__(config, model, model.embed_tokens)

    def enable_fused_decode(self) -> None:
        assert isinstance(self.model, LlamaModel)
        # NOTE: the C++ layer runs o_proj and down_proj with no all-reduce after them, so a tensor-parallel
        # shard runs the Python layer (its packed projections still use the C++ matmul kernel).
        if self.model.tp_size > 1:
            return
        for layer in self.model.layers:
            if isinstance(layer, LlamaDecoderLayer):
                layer.fused_decode = fused_decode_layer(layer)
