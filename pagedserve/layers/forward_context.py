"""The per-step context every layer reads: where this step's K/V go, what each query sees, and whether
the owning model runs the C++ kernels.

The model runner builds one `ForwardContext` per step and sets it around the forward pass and the
logits with `forward_context()`; layers read it with `get_forward_context()`, so their signatures
stay like Hugging Face's (`input_ids, positions`).

NOTE: the context is per thread. A server with several models runs each engine's steps on its own
thread, and each step must see its own model's metadata and kernel choice, never another's.
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch

from pagedserve.layers.lora import LoRABatch


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

    def padded_prefills(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefill chunks as one padded batch: (rows [sum of chunk lengths], the batch rows in chunk
        order; valid [num_chunks, longest chunk], True where a position holds a token), so an encoder can
        attend over every prompt of the step in one call instead of one call per prompt."""
        key = ("padded",)
        if key not in self._masks:
            device = self.slot_mapping.device
            starts = torch.tensor([chunk.query_start for chunk in self.prefills], device=device)
            lengths = torch.tensor([chunk.num_query_tokens for chunk in self.prefills], device=device)
            offsets = torch.arange(int(lengths.max()), device=device)
            valid = offsets[None, :] < lengths[:, None]
            self._masks[key] = ((starts[:, None] + offsets[None, :])[valid], valid)
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


@dataclass(frozen=True)
class ForwardContext:
    """What one step's layers read besides their inputs. Built once per step by the model runner."""

    attn_metadata: AttentionMetadata
    # The owning model's choice (Platform.use_cpu_kernels): the C++ kernels, or plain torch ops.
    use_cpu_kernels: bool
    # Rows served by LoRA adapters this step; None when every row runs the base model.
    lora: LoRABatch | None = None
    # Pipeline parallel, on a stage after the first: the previous stage's hidden states and residual,
    # [2, num_tokens, hidden_size].
    pipeline_inputs: torch.Tensor | None = None


class _ThreadState(threading.local):
    context: ForwardContext | None = None


_state = _ThreadState()


@contextmanager
def forward_context(context: ForwardContext) -> Iterator[None]:
    """Make `context` visible to every layer on this thread for one forward pass and its logits."""
    assert _state.context is None, "forward contexts do not nest"
    _state.context = context
    try:
        yield
    finally:
        _state.context = None


def get_forward_context() -> ForwardContext:
    context = _state.context
    assert context is not None, "a layer ran outside forward_context()"
    return context


def pipeline_inputs() -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden_states, residual) the previous pipeline stage sent, each [num_tokens, hidden_size]."""
    received = get_forward_context().pipeline_inputs
    assert received is not None, "a pipeline stage after the first ran without the previous stage's output"
    return received[0], received[1]
