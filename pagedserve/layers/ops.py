"""Hot-path primitives shared by the layers.

Each takes the fused C++ kernel (pagedserve/kernels) for float32 CPU tensors when its caller passes
`use_kernel=True`, and plain torch otherwise, so every device and dtype keeps working. The choice is
the owning model's (`ForwardContext.use_cpu_kernels`, set by its runner from `Platform`; off with
`--disable-cpu-kernels`), passed in by the layer on every call: two engines in one process can decide
differently.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from pagedserve.layers.quant import PackedWeight


def _fast(x: torch.Tensor, use_kernel: bool) -> bool:
    return use_kernel and x.dtype == torch.float32 and x.device.type == "cpu"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, use_kernel: bool) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * weight, statistics in float32."""
    if _fast(x, use_kernel):
        return torch.ops.pagedserve.rms_norm(x.contiguous(), weight, eps)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return (x32 * weight.float()).to(x.dtype)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *, use_kernel: bool
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual). May reuse x and residual's memory for the results."""
    if _fast(x, use_kernel) and x.is_contiguous() and residual.is_contiguous():
        torch.ops.pagedserve.add_rms_norm(x, residual, weight, eps)
        return x, residual
    residual = x + residual
    return rms_norm(residual, weight, eps, use_kernel=use_kernel), residual


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, head_dim: int, *, use_kernel: bool
           ) -> torch.Tensor:
    """Rotate x [num_tokens, num_heads * head_dim] by cos/sin [num_tokens, head_dim / 2] ("rotate half"
    layout). May rotate x in place; use the returned tensor."""
    if _fast(x, use_kernel) and x.stride(-1) == 1:
        torch.ops.pagedserve.rotary_inplace(x, cos, sin, head_dim)
        return x
    num_tokens = x.shape[0]
    x1, x2 = x.view(num_tokens, -1, head_dim).float().chunk(2, dim=-1)   # [num_tokens, num_heads, head_dim / 2]
    cos, sin = cos[:, None, :], sin[:, None, :]
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    return out.to(x.dtype).view(num_tokens, -1)


def silu_and_mul(x: torch.Tensor, *, use_kernel: bool) -> torch.Tensor:
    """silu(gate) * up for x = [gate | up] along the last dim."""
    if _fast(x, use_kernel) and x.is_contiguous():
        return torch.ops.pagedserve.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def gelu_tanh_and_mul(x: torch.Tensor, *, use_kernel: bool) -> torch.Tensor:
    if _fast(x, use_kernel) and x.is_contiguous():
        return torch.ops.pagedserve.gelu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.gelu(gate, approximate="tanh") * up


def packed_linear(x: torch.Tensor, weight: PackedWeight, bias: torch.Tensor | None, *, use_kernel: bool
                  ) -> torch.Tensor:
    """x @ weight^T + bias without materialising the float weights (kernel), or via dequantization."""
    if _fast(x, use_kernel):
        if weight.input_order is not None:   # act-order GPTQ: columns sorted by group
            x = x.index_select(-1, weight.input_order)
        return torch.ops.pagedserve.qlinear(x.contiguous(), weight.codes, weight.scales, weight.offsets, bias,
                                            weight.group_size, weight.bits)
    return F.linear(x, weight.dequantize().to(x.dtype), bias)


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           window: int | None, softcap: float | None, *, use_kernel: bool) -> torch.Tensor | None:
    """One query token per sequence, K/V read in place through the block tables; q: [num_seqs,
    num_heads, head_dim]. Returns None when no kernel applies (the caller takes the torch path)."""
    if not (_fast(q, use_kernel) and k_cache.dtype == torch.float32):
        return None
    out = torch.empty_like(q)                                       # [num_seqs, num_heads, head_dim]
    torch.ops.pagedserve.paged_attention(out, q.contiguous(), k_cache, v_cache, block_tables, context_lens, scale,
                                         window, softcap)
    return out
