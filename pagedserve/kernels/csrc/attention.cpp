// paged_attention (see attention.h).
#include "attention.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "common.h"

namespace pagedserve {
namespace {

// Dot products of one query head with 8 consecutive cached keys (rows `stride` floats apart).
inline void dot8(const float* q, const float* keys, int64_t stride, int64_t head_dim, float* out) {
#ifdef PS_AVX2
  if (head_dim % 8 == 0) {
    __m256 acc[8];
    for (int p = 0; p < 8; ++p) acc[p] = _mm256_setzero_ps();
    for (int64_t d = 0; d < head_dim; d += 8) {
      const __m256 qv = _mm256_loadu_ps(q + d);
      for (int p = 0; p < 8; ++p) acc[p] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(keys + p * stride + d), acc[p]);
    }
    _mm256_storeu_ps(out, hsum8(acc));
    return;
  }
#endif
  for (int p = 0; p < 8; ++p) {
    float sum = 0.f;
    for (int64_t d = 0; d < head_dim; ++d) sum += q[d] * keys[p * stride + d];
    out[p] = sum;
  }
}

// Shapes, dtypes and the values the kernel indexes with: a context length past the block table or a
// block id past the cache would read outside the cache. Costs one comparison per block visited.
void check_paged_attention(const at::Tensor& out, const at::Tensor& query, const at::Tensor& k_cache,
                           const at::Tensor& v_cache, const at::Tensor& block_tables,
                           const at::Tensor& context_lens, c10::optional<int64_t> window,
                           c10::optional<double> softcap) {
  constexpr const char* op = "paged_attention";
  check_tensor(query, op, "query", at::kFloat, 3);
  check_tensor(out, op, "out", at::kFloat, 3);
  TORCH_CHECK(out.sizes() == query.sizes(), op, ": out must have the shape of query ", query.sizes(), ", got ",
              out.sizes());
  check_tensor(k_cache, op, "k_cache", at::kFloat, 4);
  check_tensor(v_cache, op, "v_cache", at::kFloat, 4);
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), op, ": v_cache must have the shape of k_cache ", k_cache.sizes(),
              ", got ", v_cache.sizes());
  const int64_t num_seqs = query.size(0), num_heads = query.size(1), head_dim = query.size(2);
  const int64_t num_blocks = k_cache.size(0), block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  check_size(k_cache, 3, head_dim, op, "k_cache");
  TORCH_CHECK(num_kv_heads > 0 && num_heads % num_kv_heads == 0, op, ": query's ", num_heads,
              " heads must be a multiple of k_cache's ", num_kv_heads, " kv heads");
  check_tensor(block_tables, op, "block_tables", at::kLong, 2);
  check_size(block_tables, 0, num_seqs, op, "block_tables");
  check_tensor(context_lens, op, "context_lens", at::kLong, 1);
  check_size(context_lens, 0, num_seqs, op, "context_lens");
  TORCH_CHECK(!window || *window > 0, op, ": window must be None or positive, got ", *window);
  TORCH_CHECK(!softcap || *softcap > 0, op, ": softcap must be None or positive, got ", *softcap);
  const int64_t max_blocks = block_tables.size(1);
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  for (int64_t b = 0; b < num_seqs; ++b) {
    TORCH_CHECK(lens[b] >= 1 && lens[b] <= max_blocks * block_size, op, ": context_lens[", b, "] = ", lens[b],
                " must be in [1, ", max_blocks * block_size, "] (block_tables has ", max_blocks, " blocks of ",
                block_size, ")");
    for (int64_t i = 0; i < (lens[b] + block_size - 1) / block_size; ++i) {
      const int64_t block = tables[b * max_blocks + i];
      TORCH_CHECK(block >= 0 && block < num_blocks, op, ": block_tables[", b, ", ", i, "] = ", block,
                  " is not a block of the cache (", num_blocks, " blocks)");
    }
  }
}

}  // namespace

// out[b, h] = softmax(q[b, h] . K[b]^T * scale) V[b] over the sequence's first context_lens[b] tokens
// (the last `window` of them when a window is given), K/V read through block_tables[b]. Keys and values are
// walked block by block (no division per token), each row read once for all heads of its group.
void paged_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& block_tables, const at::Tensor& context_lens, double scale,
                     c10::optional<int64_t> window_or_none, c10::optional<double> softcap_or_none) {
  check_paged_attention(out, query, k_cache, v_cache, block_tables, context_lens, window_or_none, softcap_or_none);
  const int64_t window = window_or_none.value_or(0);   // 0: no window
  const double softcap = softcap_or_none.value_or(0.0);
  const int64_t num_seqs = query.size(0), num_heads = query.size(1), head_dim = query.size(2);
  const int64_t block_size = k_cache.size(1), num_kv_heads = k_cache.size(2);
  const int64_t group = num_heads / num_kv_heads;
  const int64_t max_blocks = block_tables.size(1);
  const float* q = query.data_ptr<float>();
  const float* kc = k_cache.data_ptr<float>();
  const float* vc = v_cache.data_ptr<float>();
  const int64_t* tables = block_tables.data_ptr<int64_t>();
  const int64_t* lens = context_lens.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  const int64_t token_stride = num_kv_heads * head_dim, block_stride = block_size * token_stride;
  const float fscale = static_cast<float>(scale), fcap = static_cast<float>(softcap);

  at::parallel_for(0, num_seqs * num_kv_heads, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> scores;
    std::vector<float> acc;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / num_kv_heads, kvh = item % num_kv_heads;
      const int64_t len = lens[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t count = len - first;
      scores.resize(static_cast<size_t>(group * count));
      acc.assign(static_cast<size_t>(group * head_dim), 0.f);
      const float* qg = q + (b * num_heads + kvh * group) * head_dim;
      const int64_t* table = tables + b * max_blocks;
      // Visit [first, len) block by block: fn(rows of this block, first position's index t, row count).
      auto for_each_run = [&](const float* cache, auto&& fn) {
        int64_t pos = first;
        while (pos < len) {
          const int64_t in_block = pos % block_size;
          const int64_t run = std::min(block_size - in_block, len - pos);
          fn(cache + table[pos / block_size] * block_stride + in_block * token_stride + kvh * head_dim, pos - first,
             run);
          pos += run;
        }
      };
      for_each_run(kc, [&](const float* rows, int64_t t0, int64_t run) {
        int64_t i = 0;
        for (; i + 8 <= run; i += 8)
          for (int64_t g = 0; g < group; ++g)
            dot8(qg + g * head_dim, rows + i * token_stride, token_stride, head_dim, &scores[g * count + t0 + i]);
        for (; i < run; ++i)
          for (int64_t g = 0; g < group; ++g) {
            const float* qh = qg + g * head_dim;
            const float* krow = rows + i * token_stride;
            float dot = 0.f;
            for (int64_t d = 0; d < head_dim; ++d) dot += qh[d] * krow[d];
            scores[g * count + t0 + i] = dot;
          }
      });
      for (int64_t g = 0; g < group; ++g) {
        float* row = scores.data() + g * count;
        for (int64_t i = 0; i < count; ++i) {
          row[i] *= fscale;
          if (fcap > 0.f) row[i] = std::tanh(row[i] / fcap) * fcap;
        }
        const float peak = *std::max_element(row, row + count);
        const float inv = 1.f / exp_shifted(row, row, count, peak);
        for (int64_t i = 0; i < count; ++i) row[i] *= inv;
      }
      // Weighted values, one head and 64 dims at a time so the accumulators stay in registers.
      for (int64_t g = 0; g < group; ++g) {
        const float* weights = scores.data() + g * count;
        for (int64_t d0 = 0; d0 < head_dim; d0 += 64) {
          float* a = acc.data() + g * head_dim + d0;
          const int64_t width = std::min<int64_t>(64, head_dim - d0);
#ifdef PS_AVX2
          if (width == 64) {
            __m256 sum[8];
            for (int j = 0; j < 8; ++j) sum[j] = _mm256_setzero_ps();
            for_each_run(vc, [&](const float* rows, int64_t t0, int64_t run) {
              for (int64_t i = 0; i < run; ++i) {
                const __m256 p = _mm256_set1_ps(weights[t0 + i]);
                const float* vrow = rows + i * token_stride + d0;
                for (int j = 0; j < 8; ++j) sum[j] = _mm256_fmadd_ps(p, _mm256_loadu_ps(vrow + 8 * j), sum[j]);
              }
            });
            for (int j = 0; j < 8; ++j) _mm256_storeu_ps(a + 8 * j, sum[j]);
            continue;
          }
#endif
          for_each_run(vc, [&](const float* rows, int64_t t0, int64_t run) {
            for (int64_t i = 0; i < run; ++i)
              for (int64_t d = 0; d < width; ++d) a[d] += weights[t0 + i] * rows[i * token_stride + d0 + d];
          });
        }
      }
      std::copy(acc.begin(), acc.end(), o + (b * num_heads + kvh * group) * head_dim);
    }
  });
}

}  // namespace pagedserve
