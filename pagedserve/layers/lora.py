"""LoRA deltas applied per token row: y[rows] += x[rows] @ A^T @ B^T * scaling, grouped by adapter.

The base weight is never touched (it may stay packed GGUF): each adapter's low-rank pair is held beside
the layer, keyed by the adapter's slot, and a step's `LoRABatch` (in the forward context) says which rows
use which slot. Rows of the base model (slot 0) get no delta.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class LoRAPair:
    """One adapter's update of some output rows of one layer."""

    rows: slice               # output rows it updates (one shard of a fused qkv / gate_up layer)
    a: torch.Tensor           # [rank, in_features]
    b: torch.Tensor           # [rows, rank], already multiplied by the adapter's scaling


@dataclass(frozen=True)
class LoRABatch:
    """Which token rows of this step use which adapter slot; rows absent here run the base model."""

    groups: tuple[tuple[int, torch.Tensor], ...]   # (slot, [num_rows] row indices), slot > 0


def apply_lora(x: torch.Tensor, y: torch.Tensor, pairs: dict[int, list[LoRAPair]], batch: LoRABatch) -> torch.Tensor:
    """Add each row's adapter delta to `y` = the base layer's output of `x`."""
    for slot, row_ids in batch.groups:
        for pair in pairs.get(slot, ()):
            delta = (x[row_ids] @ pair.a.T) @ pair.b.T          # [num_rows, rows of the shard]
            y[row_ids, pair.rows] += delta
    return y
