"""Multi-head latent attention (DeepSeek-V2/V3) over a paged cache of compressed latents.

Each layer's cache is one tensor [num_blocks, block_size, kv_lora_rank + qk_rope_head_dim]: per token
the normalised latent c (what kv_b_proj expands into every head's k_nope and v) and the rotated
rotary key shared by all heads. Nothing per head is cached (for DeepSeek-V3: 576 values per token and
layer instead of 2 * 128 heads * 128..192).

Prefill chunks expand their context's latents through kv_b_proj and attend as ordinary heads. Decodes
use the absorbed form, never expanding the cache: with W_uk, W_uv the k and v halves of kv_b_proj,
q_nope . (W_uk c) = (W_uk^T q_nope) . c, so each head's query moves into latent space, attends over
[c, k_rope] as one shared key head with c as the value, and its latent output is mapped back by W_uv.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.config.mla import MLAConfig
from pagedserve.layers.forward_context import AttentionMetadata, get_forward_context
from pagedserve.layers.linear import Linear


class MLAAttention(nn.Module):
    def __init__(self, num_heads: int, config: MLAConfig) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.config = config
        self.kv_cache = torch.empty(0)     # [num_blocks, block_size, kv_lora_rank + rope_dim], set by the runner
        self._absorbed: tuple[torch.Tensor, torch.Tensor] | None = None   # (W_uk, W_uv), from kv_b_proj

    def allocate_cache(self, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device) -> None:
        self.kv_cache = torch.zeros((num_blocks, block_size, self.config.cache_width), dtype=dtype, device=device)

    def forward(self, q_nope: torch.Tensor, q_rope: torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor,
                kv_b_proj: Linear) -> torch.Tensor:
        """q_nope [T, H, nope], q_rope [T, H, rope] (rotated), latent [T, r] (normed), k_rope [T, rope]
        (rotated) -> [T, H * v_head_dim]."""
        meta = get_forward_context().attn_metadata
        num_tokens = q_nope.shape[0]
        entries = torch.cat((latent, k_rope), dim=-1)                            # [T, r + rope]
        self.kv_cache.view(-1, self.config.cache_width).index_copy_(0, meta.slot_mapping, entries)
        out = q_nope.new_empty(num_tokens, self.num_heads, self.config.v_head_dim)
        if meta.num_decodes:
            decodes = slice(0, meta.num_decodes)
            out[decodes] = self._decode(q_nope[decodes], q_rope[decodes], meta, kv_b_proj)
        for index, chunk in enumerate(meta.prefills):
            rows = slice(chunk.query_start, chunk.query_start + chunk.num_query_tokens)
            out[rows] = self._prefill(q_nope[rows], q_rope[rows], meta, index, kv_b_proj)
        return out.view(num_tokens, -1)

    def _prefill(self, q_nope: torch.Tensor, q_rope: torch.Tensor, meta: AttentionMetadata, index: int,
                 kv_b_proj: Linear) -> torch.Tensor:
        config, chunk = self.config, meta.prefills[index]
        context = self.kv_cache[chunk.block_ids].flatten(0, 1)[:chunk.context_len]   # [L, r + rope]
        latent, k_rope = context.split([config.kv_lora_rank, config.qk_rope_head_dim], dim=-1)
        kv = kv_b_proj(latent).view(-1, self.num_heads, config.qk_nope_head_dim + config.v_head_dim)
        k_nope, values = kv.split([config.qk_nope_head_dim, config.v_head_dim], dim=-1)   # [L, H, *]
        keys = torch.cat((k_nope, k_rope[:, None, :].expand(-1, self.num_heads, -1)), dim=-1)
        query = torch.cat((q_nope, q_rope), dim=-1)                              # [T, H, nope + rope]
        mask = None if chunk.start == 0 else meta.prefill_mask(index, None)
        # NOTE: 4-D, as torch's CPU flash-attention kernel takes them (see Attention._prefill).
        out = F.scaled_dot_product_attention(query.transpose(0, 1)[None], keys.transpose(0, 1)[None],
                                             values.transpose(0, 1)[None], attn_mask=mask, is_causal=mask is None,
                                             scale=config.softmax_scale)
        return out[0].transpose(0, 1)                                            # [T, H, v]

    def _decode(self, q_nope: torch.Tensor, q_rope: torch.Tensor, meta: AttentionMetadata,
                kv_b_proj: Linear) -> torch.Tensor:
        w_uk, w_uv = self._absorbed_weights(kv_b_proj, q_nope.dtype)
        num_seqs, max_blocks = meta.decode_block_tables.shape
        max_len = max_blocks * self.kv_cache.shape[1]
        q_latent = torch.einsum("bhn,hnr->bhr", q_nope, w_uk)                   # [B, H, r]
        query = torch.cat((q_latent, q_rope), dim=-1)[:, :, None, :]             # [B, H, 1, r + rope]
        context = self.kv_cache[meta.decode_block_tables].view(num_seqs, 1, max_len, -1)   # [B, 1, L, r + rope]
        values = context[..., :self.config.kv_lora_rank]                         # [B, 1, L, r]
        mask = meta.decode_mask(max_len, None)                                   # [B, 1, 1, L]
        out_latent = F.scaled_dot_product_attention(query, context, values, attn_mask=mask,
                                                    scale=self.config.softmax_scale, enable_gqa=True)
        return torch.einsum("bhr,hvr->bhv", out_latent[:, :, 0], w_uv)           # [B, H, v]

    def _absorbed_weights(self, kv_b_proj: Linear, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """kv_b_proj's weight split per head into W_uk [H, nope, r] and W_uv [H, v, r], float, made once
        (the projection may be packed; the einsums need it whole)."""
        if self._absorbed is None:
            weight = kv_b_proj.packed.dequantize() if kv_b_proj.packed is not None else kv_b_proj.weight
            assert weight is not None, "kv_b_proj holds float or packed weights"
            per_head = weight.detach().to(dtype).view(self.num_heads, -1, self.config.kv_lora_rank)
            w_uk, w_uv = per_head.split([self.config.qk_nope_head_dim, self.config.v_head_dim], dim=1)
            self._absorbed = (w_uk.contiguous(), w_uv.contiguous())
        return self._absorbed
