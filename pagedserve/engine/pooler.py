"""Pooling: a finished prompt's hidden states -> one embedding vector, as its PoolerConfig says."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pagedserve.config.pooler import PoolerConfig
from pagedserve.pooling_params import PoolingParams


@dataclass(frozen=True)
class PoolingRow:
    """One prompt whose last chunk ran this step: where its rows are in the step's hidden states."""

    seq_id: int
    query_start: int      # first row of this step's chunk
    num_rows: int         # rows of this chunk
    is_whole_prompt: bool   # the chunk started at the prompt's first token
    params: PoolingParams


class Pooler:
    def __init__(self, config: PoolerConfig) -> None:
        self.config = config

    def __call__(self, hidden_states: torch.Tensor, rows: list[PoolingRow]) -> dict[int, list[float]]:
        """hidden_states: [num_tokens, hidden_size] of the step -> seq_id -> embedding (float32 values)."""
        return {row.seq_id: self._finish(self._pool(hidden_states, row), row.params).tolist() for row in rows}

    def _pool(self, hidden_states: torch.Tensor, row: PoolingRow) -> torch.Tensor:
        kind = self.config.pooling_type
        if kind == "LAST":
            return hidden_states[row.query_start + row.num_rows - 1].float()      # [hidden_size]
        # NOTE: MEAN and CLS prompts are never chunked nor served from the prefix cache (the engine
        # turns both off for them), so this step holds every one of the prompt's rows.
        assert row.is_whole_prompt, f"{kind} pooling of a prompt split into chunks"
        prompt_rows = hidden_states[row.query_start:row.query_start + row.num_rows].float()  # [num_rows, hidden]
        return prompt_rows[0] if kind == "CLS" else prompt_rows.mean(dim=0)

    def _finish(self, vector: torch.Tensor, params: PoolingParams) -> torch.Tensor:
        """Matryoshka truncation first, then normalization, as vLLM's embedding head does."""
        if params.dimensions is not None:
            vector = vector[:params.dimensions]
        normalize = self.config.normalize if params.normalize is None else params.normalize
        return F.normalize(vector, p=2, dim=-1) if normalize else vector
