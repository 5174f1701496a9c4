"""RMSNorm, optionally fused with the residual add that precedes it."""
from __future__ import annotations

import torch
from torch import nn

from pagedserve.layers import ops
from pagedserve.layers.forward_context import get_forward_context
from pagedserve.layers.weight_loader import set_weight_loader


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, weight_offset: float = 0.0) -> None:
        super().__init__()
        self.eps = eps
        # NOTE: Gemma stores `weight - 1` and scales by `1 + weight`; the offset folds that in at load.
        self.weight_offset = weight_offset
        # NOTE: float32 whatever the activation dtype: Gemma's 1 + w must not be rounded to bfloat16.
        self.weight = nn.Parameter(torch.ones(hidden_size, dtype=torch.float32), requires_grad=False)
        set_weight_loader(self.weight, self._load_weight)

    def _load_weight(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None) -> None:
        if loaded.shape != param.shape:
            raise ValueError(f"norm weight of shape {tuple(loaded.shape)} does not fit {tuple(param.shape)}")
        param.data.copy_(loaded.to(torch.float32) + self.weight_offset)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """rms_norm(x), or with a residual (rms_norm(x + residual), x + residual)."""
        use_kernel = get_forward_context().use_cpu_kernels
        if residual is None:
            return ops.rms_norm(x, self.weight, self.eps, use_kernel=use_kernel)
        return ops.add_rms_norm(x, residual, self.weight, self.eps, use_kernel=use_kernel)


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias (BERT, GPT-2), in the activation dtype as transformers runs it."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = set_weight_loader(nn.Parameter(torch.ones(hidden_size), requires_grad=False), _copy_vector)
        self.bias = set_weight_loader(nn.Parameter(torch.zeros(hidden_size), requires_grad=False), _copy_vector)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


def _copy_vector(param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None) -> None:
    if loaded.shape != param.shape:
        raise ValueError(f"norm parameter of shape {tuple(loaded.shape)} does not fit {tuple(param.shape)}")
    param.data.copy_(loaded)
