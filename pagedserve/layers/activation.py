"""Gated MLP activations over a fused [gate | up] projection."""
from __future__ import annotations

import torch
from torch import nn

from pagedserve.layers import ops
from pagedserve.layers.forward_context import get_forward_context


class SiluAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [num_tokens, 2 * intermediate] -> [num_tokens, intermediate]
        return ops.silu_and_mul(x, use_kernel=get_forward_context().use_cpu_kernels)


class GeluTanhAndMul(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.gelu_tanh_and_mul(x, use_kernel=get_forward_context().use_cpu_kernels)


_ACTIVATIONS = {
    "silu": SiluAndMul,
    "swish": SiluAndMul,
    "gelu_pytorch_tanh": GeluTanhAndMul,
    "gelu_tanh": GeluTanhAndMul,
    "gelu": GeluTanhAndMul,
}


def gated_activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {', '.join(sorted(_ACTIVATIONS))}")
    return _ACTIVATIONS[name]()
