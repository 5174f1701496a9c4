"""The Llama-family decoder layer as one C++ call, for steps that only decode (one query token per
sequence), float32 activations with packed weights: `torch.classes.pagedserve.LlamaDecodeLayer`
(pagedserve/kernels/csrc/fused_layer.h). `FusedDecodeLayer` and `packed_linear` serve every family's
fused layer (Gemma 3's too)."""
from __future__ import annotations

from typing import Any

import torch

from pagedserve.layers.activation import SiluAndMul
from pagedserve.layers.forward_context import get_forward_context
from pagedserve.layers.linear import Linear


class FusedDecodeLayer:
    """A decoder layer run as one C++ call on decode-only steps. Built once after loading (by
    `fused_decode_layer`, or the family's own builder); the C++ object checked the weights then and holds
    references, not copies, so a step passes (and the C++ side checks) only that step's tensors."""

    def __init__(self, kernel: torch.ScriptObject) -> None:
        self.kernel = kernel
        # NOTE: looked up once; a ScriptObject attribute costs a lookup per call
        self._forward = getattr(kernel, "forward")

    def __call__(self, cos_sin, hidden: torch.Tensor, residual: torch.Tensor | None, attn
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        meta = get_forward_context().attn_metadata
        first = residual is None
        if residual is None:
            residual = torch.empty_like(hidden)                  # [num_decodes, hidden_size], filled by the call
        out = self._forward(hidden, residual, first, cos_sin[0], cos_sin[1], attn.k_cache, attn.v_cache,
                            meta.slot_mapping, meta.decode_block_tables, meta.decode_context_lens)
        return out, residual


def fused_decode_layer(layer: Any) -> FusedDecodeLayer | None:
    """The layer as one C++ call for decode-only steps, when its weights and activation allow it.
    Needs the CPU kernels loaded (`pagedserve.kernels.cpu_kernels_available()`)."""
    attn, mlp = layer.self_attn, layer.mlp
    if not isinstance(mlp.act, SiluAndMul) or not can_fuse((attn.qkv_proj, attn.o_proj, mlp.gate_up_proj,
                                                            mlp.down_proj)):
        return None
    kernel = torch.classes.pagedserve.LlamaDecodeLayer(
        input_norm=layer.input_layernorm.weight,
        post_norm=layer.post_attention_layernorm.weight,
        qkv_proj=packed_linear(attn.qkv_proj),
        o_proj=packed_linear(attn.o_proj),
        gate_up_proj=packed_linear(mlp.gate_up_proj),
        down_proj=packed_linear(mlp.down_proj),
        q_norm=attn.q_norm.weight if attn.qk_norm else None,
        k_norm=attn.k_norm.weight if attn.qk_norm else None,
        num_heads=attn.num_heads,
        num_kv_heads=attn.num_kv_heads,
        head_dim=attn.head_dim,
        sliding_window=attn.attn.sliding_window,
        # NOTE: one epsilon for every norm of the layer, q/k norms included: the config has one.
        eps=layer.input_layernorm.eps,
        scale=attn.attn.scale,
    )
    return FusedDecodeLayer(kernel)


def can_fuse(projections: tuple[Linear, ...]) -> bool:
    """True when every projection is packed in an order the C++ layers read (act-order GPTQ needs a
    gather of x, which they do not have)."""
    return all(p.packed is not None and p.packed.input_order is None for p in projections)


def packed_linear(projection: Linear) -> torch.ScriptObject:
    """The projection's packed weight and bias as the C++ layers hold them."""
    packed = projection.packed
    assert packed is not None, "fused layers are built from packed projections only"
    return torch.classes.pagedserve.PackedLinear(codes=packed.codes, scales=packed.scales, offsets=packed.offsets,
                                                 bias=projection.bias, group_size=packed.group_size,
                                                 bits=packed.bits)
