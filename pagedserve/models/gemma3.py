"""Gemma 3 (text): interleaved sliding-window and global attention, (1 + w) RMSNorms, scaled embeddings.

Differences from Llama, all following transformers' modeling_gemma3.py:
- embeddings are multiplied by sqrt(hidden_size), rounded to the activation dtype first;
- every RMSNorm scales by (1 + w): the checkpoint's w gets 1 added at load (`weight_offset=1.0`);
- each layer norms both sides of attention and of the MLP (four norms), and q/k per head;
- queries are scaled by query_pre_attn_scalar ** -0.5, not head_dim ** -0.5;
- sliding layers rotate with their own base (`local_rope_theta`, unscaled); global layers with
  `rope_theta` and the config's rope scaling (linear for the larger models);
- final logits are tanh soft-capped when the config sets `final_logit_softcapping`.

Decode-only steps run each layer as one C++ call (`gemma3_fused_decode_layer`, kernels/csrc/fused_layer.h)
when its projections are packed; it runs the same kernels as the Python layer, so the results are equal.

NOTE: `attn_logit_softcapping` is ignored, as transformers (whose Gemma 3 attention never passes it
on; Gemma 2's does), vLLM and llama.cpp all ignore it for Gemma 3. No released Gemma 3 sets it.

NOTE: KV blocks that fall wholly outside a sliding layer's window are kept, not freed. A block holds
every layer's K/V for its tokens, so it could only go once every layer's window had passed it, and
Gemma 3's global layers read all of them. (Mistral, whose layers all slide, keeps them too: the
sliding layers only mask what lies outside their window.)
"""
from __future__ import annotations

import torch
from torch import nn

from pagedserve.config import ModelConfig
from pagedserve.distributed import current_model_parallel
from pagedserve.layers.activation import GeluTanhAndMul
from pagedserve.layers.attention import Attention
from pagedserve.layers.forward_context import get_forward_context
from pagedserve.layers.linear import VocabEmbedding
from pagedserve.layers.parallel_linear import QKVParallelLinear, RowParallelLinear
from pagedserve.layers.norm import RMSNorm
from pagedserve.layers.rotary import CosSin, RotaryEmbedding, apply_rotary
from pagedserve.models.causal_lm import CausalLM
from pagedserve.models.llama import PACKED_MODULES, LlamaMLP
from pagedserve.models.llama_fused import FusedDecodeLayer, can_fuse, packed_linear

# Gemma 3's default base for the sliding layers, when a config names none.
DEFAULT_LOCAL_ROPE_THETA = 10_000.0


def _gemma_norm(size: int, config: ModelConfig) -> RMSNorm:
    return RMSNorm(size, config.rms_norm_eps, weight_offset=1.0)


class Gemma3Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.head_dim = config.head_dim
        # this rank's heads (all of them on one rank)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                          config.num_key_value_heads, bias=config.attention_bias)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size,
                                        bias=config.attention_bias)
        self.q_norm = _gemma_norm(self.head_dim, config)
        self.k_norm = _gemma_norm(self.head_dim, config)
        scalar = config.query_pre_attn_scalar or self.head_dim
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, scale=scalar ** -0.5,
                              sliding_window=config.sliding_windows[layer_index])

    def forward(self, cos_sin: CosSin, hidden_states: torch.Tensor) -> torch.Tensor:
        qkv = self.qkv_proj(hidden_states)                  # [num_tokens, q_size + 2 * kv_size]
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = self.q_norm(q.reshape(-1, self.head_dim)).view(q.shape[0], -1)   # [num_tokens, q_size]
        k = self.k_norm(k.reshape(-1, self.head_dim)).view(k.shape[0], -1)   # [num_tokens, kv_size]
        q = apply_rotary(q, cos_sin, self.head_dim)
        k = apply_rotary(k, cos_sin, self.head_dim)
        return self.o_proj(self.attn(q, k, v.contiguous()))


class Gemma3DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__()
        self.is_sliding = config.sliding_windows[layer_index] is not None
        self.input_layernorm = _gemma_norm(config.hidden_size, config)
        self.self_attn = Gemma3Attention(config, layer_index)
        self.post_attention_layernorm = _gemma_norm(config.hidden_size, config)
        self.pre_feedforward_layernorm = _gemma_norm(config.hidden_size, config)
        self.mlp = LlamaMLP(config)
        self.post_feedforward_layernorm = _gemma_norm(config.hidden_size, config)
        self.fused_decode: FusedDecodeLayer | None = None   # set by enable_fused_decode once weights are loaded

    def forward(self, cos_sin: CosSin, hidden_states: torch.Tensor, residual: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (this layer's MLP output after its post-norm, the residual stream before adding it)."""
        context = get_forward_context()
        if self.fused_decode is not None and context.use_cpu_kernels and context.attn_metadata.is_decode_only \
                and context.lora is None:   # the fused C++ layer knows no adapters
            return self.fused_decode(cos_sin, hidden_states, residual, self.self_attn.attn)
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.post_attention_layernorm(self.self_attn(cos_sin, hidden_states))
        hidden_states, residual = self.pre_feedforward_layernorm(hidden_states, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden_states)), residual


def gemma3_fused_decode_layer(layer: Gemma3DecoderLayer) -> FusedDecodeLayer | None:
    """The layer as one C++ call (`torch.classes.pagedserve.Gemma3DecodeLayer`) for decode-only steps,
    when its projections are packed. Needs the CPU kernels loaded. The norm weights already hold 1 + w,
    and the caller passes the layer's own rotary table (local or global), as the Python layer gets it."""
    attn, mlp = layer.self_attn, layer.mlp
    if not isinstance(mlp.act, GeluTanhAndMul) or not can_fuse((attn.qkv_proj, attn.o_proj, mlp.gate_up_proj,
                                                                mlp.down_proj)):
        return None
    kernel = torch.classes.pagedserve.Gemma3DecodeLayer(
        input_norm=layer.input_layernorm.weight,
        post_attention_norm=layer.post_attention_layernorm.weight,
        pre_feedforward_norm=layer.pre_feedforward_layernorm.weight,
        post_feedforward_norm=layer.post_feedforward_layernorm.weight,
        qkv_proj=packed_linear(attn.qkv_proj),
        o_proj=packed_linear(attn.o_proj),
        gate_up_proj=packed_linear(mlp.gate_up_proj),
        down_proj=packed_linear(mlp.down_proj),
        q_norm=attn.q_norm.weight,
        k_norm=attn.k_norm.weight,
        num_heads=attn.num_heads,
        num_kv_heads=attn.num_kv_heads,
        head_dim=attn.head_dim,
        sliding_window=attn.attn.sliding_window,
        # NOTE: one epsilon for all six norms of the layer, q/k norms included: the config has one.
        eps=layer.input_layernorm.eps,
        scale=attn.attn.scale,
    )
    return FusedDecodeLayer(kernel)


class Gemma3Model(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.tp_size = current_model_parallel().tp.size
        self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size)
        # NOTE: float32 here, rounded to the activation dtype in forward, as transformers does
        # (in bfloat16 sqrt(640) becomes 25.25, and the checkpoints were trained that way).
        self.register_buffer("embed_scale", torch.tensor(config.hidden_size ** 0.5, dtype=torch.float32),
                             persistent=False)
        self.rotary_emb = RotaryEmbedding(config.head_dim, config.rope_theta, config.rope_scaling)
        local_theta = config.local_rope_theta or DEFAULT_LOCAL_ROPE_THETA
        self.rotary_emb_local = RotaryEmbedding(config.head_dim, local_theta)
        self.layers = nn.ModuleList(Gemma3DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = _gemma_norm(config.hidden_size, config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden_states = self.embed_tokens(input_ids)            # [num_tokens, hidden_size]
        hidden_states = hidden_states * self.embed_scale.to(hidden_states.dtype)
        cos_sin_global = self.rotary_emb(positions)
        cos_sin_local = self.rotary_emb_local(positions)
        residual = None
        for layer in self.layers:
            cos_sin = cos_sin_local if layer.is_sliding else cos_sin_global
            hidden_states, residual = layer(cos_sin, hidden_states, residual)
        hidden_states, _ = self.norm(hidden_states, residual)
        return hidden_states


class Gemma3ForCausalLM(CausalLM):
    packed_modules = PACKED_MODULES
    supports_tensor_parallel = True

    def __init__(self, config: ModelConfig) -> None:
        model = Gemma3Model(config)
        super().__init__(config, model, model.embed_tokens)
        self.final_logit_softcap = config.final_logit_softcapping

    def enable_fused_decode(self) -> None:
        assert isinstance(self.model, Gemma3Model)
        # NOTE: the C++ layer runs o_proj and down_proj with no all-reduce after them, so a tensor-parallel
        # shard runs the Python layer (its packed projections still use the C++ matmul kernel).
        if self.model.tp_size > 1:
            return
        for layer in self.model.layers:
            if isinstance(layer, Gemma3DecoderLayer):
                layer.fused_decode = gemma3_fused_decode_layer(layer)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[num_rows, hidden_size] -> [num_rows, vocab_size] float32 logits, soft-capped if configured."""
        logits = super().compute_logits(hidden_states)
        if self.final_logit_softcap is not None:
            logits = torch.tanh(logits / self.final_logit_softcap) * self.final_logit_softcap
        return logits


class Gemma3ForConditionalGeneration(Gemma3ForCausalLM):
    """The text half of a multimodal Gemma 3 checkpoint; the vision tower and projector are skipped.

    transformers 4.5x+ saves the text model under `model.language_model.`, older exports under
    `language_model.model.`; both are renamed to the text-only names.
    """

    checkpoint_prefixes = {
        "model.language_model.": "model.",
        "language_model.model.": "model.",
        "language_model.lm_head.": "lm_head.",
    }
    ignored_checkpoint_prefixes = ("model.vision_tower.", "model.multi_modal_projector.",
                                   "vision_tower.", "multi_modal_projector.")
