"""Rotary position embeddings (the "rotate half" layout of Hugging Face checkpoints)."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from pagedserve.layers import ops
from pagedserve.layers.forward_context import get_forward_context

CosSin = tuple[torch.Tensor, torch.Tensor]


class RotaryEmbedding(nn.Module):
    """Maps positions to (cos, sin) once per step; every layer then rotates its q and k with them."""

    inv_freq: torch.Tensor       # [head_dim / 2], a buffer

    def __init__(self, head_dim: int, base: float, scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.head_dim = head_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", _scale_inv_freq(inv_freq, scaling), persistent=False)

    def forward(self, positions: torch.Tensor) -> CosSin:
        # float32 products, as transformers computes them, so long positions round the same way.
        freqs = positions[:, None].float() * self.inv_freq[None, :]     # [num_tokens, head_dim / 2]
        return freqs.cos(), freqs.sin()


def apply_rotary(x: torch.Tensor, cos_sin: CosSin, head_dim: int) -> torch.Tensor:
    """x: [num_tokens, num_heads * head_dim] -> the same, rotated (possibly in place: use the result)."""
    return ops.rotary(x, cos_sin[0], cos_sin[1], head_dim, use_kernel=get_forward_context().use_cpu_kernels)


def _scale_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any] | None) -> torch.Tensor:
    if scaling is None:
        return inv_freq
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3_inv_freq(inv_freq, scaling)
    raise ValueError(f"unsupported rope scaling type {rope_type!r}; supported: default, linear, llama3")


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's frequency-dependent scaling: long wavelengths slowed by `factor`, short ones kept."""
    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_context = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_context / low_freq_factor
    high_freq_wavelen = old_context / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)
