"""What one embedding request asks of the pooler (vLLM's PoolingParams)."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PoolingParams:
    """`dimensions`: keep the first N values of the vector (Matryoshka models only), `normalize`: None
    follows the model's config."""

    dimensions: int | None = None
    normalize: bool | None = None

    def __post_init__(self) -> None:
        if self.dimensions is not None and self.dimensions < 1:
            raise ValueError(f"dimensions must be at least 1, got {self.dimensions}")
