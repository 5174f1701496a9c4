"""RMSNorm, optionally fused with the residual add that precedes it."""
from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6, weight_offset: float = 0.0) -> None:
        super().__init__()
        self.eps = eps
        # NOTE: Gemma stores `weight - 1` and scales by `1 + weight`; the offset folds that in at load.
        self.weight_offset = weight_offset
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.weight.weight_loader = self._load_weight

    def _load_weight(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None) -> None:
        param.data.copy_(loaded.to(torch.float32) + self.weight_offset)

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        # Statistics in float32 whatever the activation dtype, as the reference implementations do.
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (x32 * self.weight.float()).to(x.dtype)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            return self._norm(x)
        residual = x + residual
        return self._norm(residual), residual
