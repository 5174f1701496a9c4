"""The Llama-family decoder layer as one C++ call, for steps that only decode (one query token per
sequence), float32 activations with packed weights."""
from __future__ import annotations

from typing import Any

import torch

from pagedserve.layers.activation import SiluAndMul
from pagedserve.layers.forward_context import get_forward_context


class FusedDecodeLayer:
    """A Llama-family decoder layer run as one C++ call for steps that only decode (one query token per
    sequence), float32 with packed weights. Built once after loading; holds references, not copies."""

    def __init__(self, input_norm, post_norm, projections, q_norm: torch.Tensor | None,
                 k_norm: torch.Tensor | None, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        weights: list[torch.Tensor | None] = [input_norm.weight, post_norm.weight]
        ints: list[int] = []
        for projection in projections:
            packed = projection.packed
            weights += [packed.codes, packed.scales, packed.offsets, getattr(projection, "bias", None)]
            ints += [packed.group_size, packed.bits]
        weights += [q_norm, k_norm]
        self.weights = weights
        self.ints = ints + [num_heads, num_kv_heads, head_dim]
        self.eps = input_norm.eps
        self.head_dim = head_dim

    def __call__(self, cos_sin, hidden: torch.Tensor, residual: torch.Tensor | None, attn
                 ) -> tuple[torch.Tensor, torch.Tensor] | None:
        meta = get_forward_context()
        first = residual is None
        if first:
            residual = torch.empty_like(hidden)
        out = torch.ops.pagedserve.llama_decode_layer(
            hidden, residual, first, self.weights, self.ints + [attn.sliding_window or 0], [self.eps, attn.scale],
            cos_sin[0], cos_sin[1], attn.k_cache, attn.v_cache, meta.slot_mapping, meta.decode_block_tables,
            meta.decode_context_lens)
        return out, residual


def fused_decode_layer(layer: Any) -> FusedDecodeLayer | None:
    """The layer as one C++ call for decode-only steps, when its weights and activation allow it."""
    attn, mlp = layer.self_attn, layer.mlp
    projections = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
    if not isinstance(mlp.act, SiluAndMul) or any(p.packed is None for p in projections):
        return None
    q_norm = attn.q_norm.weight if attn.qk_norm else None
    k_norm = attn.k_norm.weight if attn.qk_norm else None
    return FusedDecodeLayer(layer.input_layernorm, layer.post_attention_layernorm, projections,
                            q_norm, k_norm, attn.num_heads, attn.num_kv_heads, attn.head_dim)
