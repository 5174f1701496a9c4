"""Attention over the paged KV cache.

Each layer's cache is a pair of tensors [num_blocks, block_size, num_kv_heads, head_dim]. A step's
new K/V are written to their slots first; then each query attends through its sequence's block table.
The batch puts decodes (one query token each) first, attended together in one batched call, and then
prefill chunks, each attended on its own with a causal mask offset by what is already cached.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.layers import ops
from pagedserve.layers.forward_context import AttentionMetadata, get_forward_context


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float,
                 sliding_window: int | None = None, logit_softcap: float | None = None) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        self.sliding_window = sliding_window
        self.logit_softcap = logit_softcap
        # Set by the model runner once the cache is allocated.
        self.k_cache = torch.empty(0)
        self.v_cache = torch.empty(0)

    def allocate_cache(self, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device) -> None:
        shape = (num_blocks, block_size, self.num_kv_heads, self.head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q: [num_tokens, num_heads * head_dim]; k, v: [num_tokens, num_kv_heads * head_dim]."""
        context = get_forward_context()
        meta = context.attn_metadata
        num_tokens = q.shape[0]
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        flat_shape = (-1, self.num_kv_heads, self.head_dim)
        self.k_cache.view(flat_shape).index_copy_(0, meta.slot_mapping, k)
        self.v_cache.view(flat_shape).index_copy_(0, meta.slot_mapping, v)

        out = torch.empty_like(q)                                   # [num_tokens, num_heads, head_dim]
        if meta.num_decodes:
            out[:meta.num_decodes] = self._decode(q[:meta.num_decodes], meta, context.use_cpu_kernels)
        for index, chunk in enumerate(meta.prefills):
            rows = slice(chunk.query_start, chunk.query_start + chunk.num_query_tokens)
            out[rows] = self._prefill(q[rows], k[rows], v[rows], meta, index)
        return out.view(num_tokens, self.num_heads * self.head_dim)

    def _decode(self, q: torch.Tensor, meta: AttentionMetadata, use_kernel: bool) -> torch.Tensor:
        out = ops.paged_decode_attention(q, self.k_cache, self.v_cache, meta.decode_block_tables,
                                         meta.decode_context_lens, self.scale, self.sliding_window, self.logit_softcap,
                                         use_kernel=use_kernel)
        if out is not None:
            return out
        num_seqs, max_blocks = meta.decode_block_tables.shape
        max_len = max_blocks * self.k_cache.shape[1]
        # [num_seqs, num_kv_heads, max_len, head_dim], gathered through the block tables
        keys = self.k_cache[meta.decode_block_tables].view(num_seqs, max_len, self.num_kv_heads, -1).transpose(1, 2)
        values = self.v_cache[meta.decode_block_tables].view(num_seqs, max_len, self.num_kv_heads, -1).transpose(1, 2)
        mask = meta.decode_mask(max_len, self.sliding_window)
        out = self._attend(q.unsqueeze(2), keys, values, mask)      # [num_seqs, num_heads, 1, head_dim]
        return out.squeeze(2)

    def _prefill(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata,
                 index: int) -> torch.Tensor:
        chunk = meta.prefills[index]
        # NOTE: [1, heads, tokens, head_dim], not 3-D: torch's CPU flash-attention kernel takes only
        # 4-D inputs, and 3-D ones fell back to the math path, which materializes every score
        # (a 1,500-token prompt's prefill spent half its time there, 2.7x the flash kernel's).
        query = q.transpose(0, 1)[None]
        if chunk.start == 0 and self.sliding_window is None and self.logit_softcap is None:
            # Nothing cached before this chunk: attend to its own K/V with the built-in causal mask.
            out = F.scaled_dot_product_attention(query, k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                                                 is_causal=True, scale=self.scale, enable_gqa=True)
            return out[0].transpose(0, 1)
        # [1, num_kv_heads, context_len, head_dim]
        keys = self.k_cache[chunk.block_ids].flatten(0, 1)[:chunk.context_len].transpose(0, 1)[None]
        values = self.v_cache[chunk.block_ids].flatten(0, 1)[:chunk.context_len].transpose(0, 1)[None]
        mask = meta.prefill_mask(index, self.sliding_window)
        return self._attend(query, keys, values, mask)[0].transpose(0, 1)

    def _attend(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                mask: torch.Tensor) -> torch.Tensor:
        """q: [..., num_heads, q_len, head_dim]; keys/values: [..., num_kv_heads, k_len, head_dim]."""
        if self.logit_softcap is None:
            return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=self.scale,
                                                  enable_gqa=True)
        group = self.num_heads // self.num_kv_heads
        keys = keys.repeat_interleave(group, dim=-3)
        values = values.repeat_interleave(group, dim=-3)
        scores = torch.matmul(q.float(), keys.float().transpose(-1, -2)) * self.scale
        scores = torch.tanh(scores / self.logit_softcap) * self.logit_softcap
        scores = scores.masked_fill(~mask, float("-inf"))
        return torch.matmul(scores.softmax(-1), values.float()).to(q.dtype)
