"""Group-quantized weights kept packed: int8 codes plus a float scale (and offset) per group.

w[n, k] = scales[n, k // group_size] * codes[n, k] + offsets[n, k // group_size]

Every GGUF block format the loader repacks (Q4_0/1, Q5_0/1, Q8_0, Q4_K, Q5_K, Q6_K) is exactly this,
so the packed weights compute the same function as the dequantized ones while moving 3-4x fewer
bytes per token through memory.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedWeight:
    codes: torch.Tensor              # [out_features, in_features] int8
    scales: torch.Tensor             # [out_features, in_features // group_size] float32
    offsets: torch.Tensor | None     # same shape as scales; None for symmetric formats
    group_size: int

    @property
    def shape(self) -> torch.Size:
        return self.codes.shape

    def dequantize(self) -> torch.Tensor:
        """float32 [out_features, in_features]."""
        rows, cols = self.codes.shape
        grouped = self.codes.view(rows, cols // self.group_size, self.group_size).float()
        values = grouped * self.scales[..., None]
        if self.offsets is not None:
            values = values + self.offsets[..., None]
        return values.view(rows, cols)

    def regroup(self, group_size: int) -> PackedWeight:
        """The same weights described with smaller groups (each scale repeated); exact."""
        if group_size == self.group_size:
            return self
        if self.group_size % group_size:
            raise ValueError(f"cannot regroup {self.group_size}-weight groups into groups of {group_size}")
        repeat = self.group_size // group_size
        offsets = None if self.offsets is None else self.offsets.repeat_interleave(repeat, dim=1)
        return PackedWeight(self.codes, self.scales.repeat_interleave(repeat, dim=1), offsets, group_size)

    def rows(self, index: torch.Tensor) -> PackedWeight:
        """The weights of the given output rows (e.g. to undo a row permutation)."""
        offsets = None if self.offsets is None else self.offsets[index]
        return PackedWeight(self.codes[index], self.scales[index], offsets, self.group_size)
