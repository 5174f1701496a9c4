"""How a parameter takes its checkpoint tensors: each parameter carries its own `weight_loader`, called as
`weight_loader(param, tensor, shard_id)` with the checkpoint's tensor (float, or a PackedWeight of
quantized blocks) and, for fused parameters, which piece it is (e.g. "q" of qkv_proj)."""
from __future__ import annotations

from typing import Any, Callable

from torch import nn

WeightLoader = Callable[[nn.Parameter, Any, "str | None"], None]


def set_weight_loader(param: nn.Parameter, loader: WeightLoader) -> nn.Parameter:
    setattr(param, "weight_loader", loader)
    return param


def weight_loader(param: nn.Parameter) -> WeightLoader:
    loader: WeightLoader = getattr(param, "weight_loader")
    return loader
