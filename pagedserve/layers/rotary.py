"""Rotary position embeddings (the "rotate half" layout of Hugging Face checkpoints)."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from pagedserve.config.mla import yarn_mscale
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
        # NOTE: YaRN also scales cos and sin (its attention factor); every other type leaves them.
        self.attention_factor = 1.0
        if scaling is not None and (scaling.get("rope_type") or scaling.get("type")) == "yarn":
            inv_freq, self.attention_factor = _yarn_inv_freq(inv_freq, base, head_dim, scaling)
        else:
            inv_freq = _scale_inv_freq(inv_freq, scaling)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, positions: torch.Tensor) -> CosSin:
        # float32 products, as transformers computes them, so long positions round the same way.
        freqs = positions[:, None].float() * self.inv_freq[None, :]     # [num_tokens, head_dim / 2]
        if self.attention_factor != 1.0:
            return freqs.cos() * self.attention_factor, freqs.sin() * self.attention_factor
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
    raise ValueError(f"unsupported rope scaling type {rope_type!r}; supported: default, linear, llama3, yarn")


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


def _yarn_inv_freq(inv_freq: torch.Tensor, base: float, head_dim: int, scaling: dict[str, Any]
                   ) -> tuple[torch.Tensor, float]:
    """YaRN (as transformers' _compute_yarn_parameters): frequencies below the original context's
    `beta_slow` rotations interpolated by `factor`, above `beta_fast` kept, a linear ramp between; and
    the cos/sin factor mscale(factor, mscale) / mscale(factor, mscale_all_dim), or given outright."""
    factor = scaling["factor"]
    original = scaling["original_max_position_embeddings"]
    attention_factor = scaling.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = scaling.get("mscale"), scaling.get("mscale_all_dim")
        attention_factor = (yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all_dim)
                            if mscale and mscale_all_dim else yarn_mscale(factor))
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1

    def correction_dim(num_rotations: float) -> float:
        return head_dim * math.log(original / (num_rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001   # no zero-width ramp
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp                                   # 1: extrapolate (keep the frequency), 0: interpolate
    return inv_freq / factor * (1 - keep) + inv_freq * keep, float(attention_factor)
