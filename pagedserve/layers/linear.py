"""Linear layers whose parameters load their own shards (fused QKV and gate/up projections)."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Linear(nn.Module):
    """y = x W^T + b, where W may be several checkpoint tensors stacked along the output dim.

    `shard_sizes` names the stacked pieces in order (e.g. q, k, v); the loader passes the piece's
    name as `shard_id` and the parameter copies it into its rows.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 shard_sizes: dict[str, int] | None = None) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for shard_id, size in (shard_sizes or {}).items():
            self.shard_offsets[shard_id] = (offset, size)
            offset += size
        if shard_sizes and offset != out_features:
            raise ValueError(f"shard sizes add up to {offset}, not out_features={out_features}")
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self._load_shard
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False)
            self.bias.weight_loader = self._load_shard
        else:
            self.bias = None

    def _load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None) -> None:
        target = param.data
        if shard_id is not None:
            offset, size = self.shard_offsets[shard_id]
            target = target.narrow(0, offset, size)
        if target.shape != loaded.shape:
            raise ValueError(f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit a parameter "
                             f"of shape {tuple(target.shape)}")
        target.copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class VocabEmbedding(nn.Module):
    """Token embedding; also the output projection when the checkpoint ties them."""

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(vocab_size, hidden_size), requires_grad=False)
        self.weight.weight_loader = _copy_whole

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.weight)


def _copy_whole(param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit a parameter "
                         f"of shape {tuple(param.shape)}")
    param.data.copy_(loaded)
