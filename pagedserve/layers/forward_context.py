"""The per-step context every attention layer reads: where this step's K/V go and what each query sees.

The model runner builds one `AttentionMetadata` per step and sets it around the forward pass with
`forward_context()`; layers read it with `get_forward_context()`, so their signatures stay like
Hugging Face's (`input_ids, positions`).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch


@dataclass(frozen=True)
class PrefillChunk:
    query_start: int          # first row of this chunk in the batch
    num_query_tokens: int
    start: int                # position of the first query token = tokens cached before it
    block_ids: torch.Tensor   # [num_blocks] the sequence's block table

    @property
    def context_len(self) -> int:
        return self.start + self.num_query_tokens


@dataclass
class AttentionMetadata:
    """What one step's attention needs. Built once per step by the model runner, read by every layer."""

    slot_mapping: torch.Tensor          # [num_tokens] flat cache slot of each new token
    num_decodes: int
    decode_block_tables: torch.Tensor   # [num_decodes, max_num_blocks]
    decode_context_lens: torch.Tensor   # [num_decodes] tokens each decode attends to, itself included
    prefills: list[PrefillChunk]
    # Masks depend only on the step and the window, so layers with the same window share them.
    _masks: dict = field(default_factory=dict)

    @property
    def is_decode_only(self) -> bool:
        return not self.prefills

    def decode_mask(self, max_len: int, window: int | None) -> torch.Tensor:
        """[num_decodes, 1, 1, max_len] True where a key is visible."""
        key = ("decode", window)
        if key not in self._masks:
            key_pos = torch.arange(max_len, device=self.decode_context_lens.device)
            lens = self.decode_context_lens[:, None]
            visible = key_pos[None, :] < lens
            if window is not None:
                visible &= key_pos[None, :] >= lens - window
            self._masks[key] = visible[:, None, None, :]
        return self._masks[key]

    def prefill_mask(self, index: int, window: int | None) -> torch.Tensor:
        """[num_query_tokens, context_len] True where a key is visible to a query."""
        key = ("prefill", index, window)
        if key not in self._masks:
            chunk = self.prefills[index]
            device = chunk.block_ids.device
            query_pos = torch.arange(chunk.start, chunk.context_len, device=device)[:, None]
            key_pos = torch.arange(chunk.context_len, device=device)[None, :]
            visible = key_pos <= query_pos
            if window is not None:
                visible &= key_pos > query_pos - window
            self._masks[key] = visible
        return self._masks[key]


_forward_context: AttentionMetadata | None = None


@contextmanager
def forward_context(metadata: AttentionMetadata) -> Iterator[None]:
    """Make `metadata` visible to every attention layer for the duration of one forward pass."""
    global _forward_context
    assert _forward_context is None, "forward contexts do not nest"
    _forward_context = metadata
    try:
        yield
    finally:
        _forward_context = None


def get_forward_context() -> AttentionMetadata:
    assert _forward_context is not None, "attention called outside forward_context()"
    return _forward_context
