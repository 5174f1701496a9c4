// paged_attention: one query token per sequence, reading K/V in place through the block table.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace pagedserve {

// out, query: [num_seqs, num_heads, head_dim]; k_cache, v_cache: [num_blocks, block_size,
// num_kv_heads, head_dim]; block_tables: [num_seqs, max_blocks]; context_lens: [num_seqs].
// `window`: attend to the last `window` tokens only; `softcap`: tanh soft-capping of the scores.
void paged_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                     c10::optional<int64_t> window, c10::optional<double> softcap);

}  // namespace pagedserve
