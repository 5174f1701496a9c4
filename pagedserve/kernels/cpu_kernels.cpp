// CPU kernels of pagedserve (float32 activations), registered as torch.ops.pagedserve.*.
//
// qlinear:          y = x @ dequant(W)^T (+ bias), W kept as int8 codes with a float scale and offset
//                   per group of 16 or 32 weights: w = scale * q + offset. Every GGUF block format we
//                   load (Q4_0/1, Q5_0/1, Q8_0, Q4_K, Q5_K, Q6_K) is exactly this after unpacking.
// paged_attention:  one query token per sequence, reading K/V in place through the block table.
// add_rms_norm, rms_norm, rotary_inplace, silu_and_mul, gelu_and_mul: fused elementwise work that
//                   would otherwise cost several torch ops (and Python dispatches) each.
//
// Built at first use with -march=native (torch.utils.cpp_extension), so AVX2/AVX-512 paths follow
// the machine; parallelism uses torch's own thread pool (at::parallel_for).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define PS_AVX2 1
#endif

namespace {

#ifdef PS_AVX2
inline float hsum(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v);
  __m128 hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

// 8 int8 codes -> 8 floats.
inline __m256 load_codes8(const int8_t* q) {
  __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(q));
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
}
#endif

// ---- qlinear ------------------------------------------------------------------------------------

// Few rows (decode): stream each weight row once, dequantize in registers, dot with every x row.
template <int G>
void qlinear_rows(const float* x, int64_t num_rows, int64_t K, const int8_t* q, const float* scale,
                  const float* offset, const float* bias, float* y, int64_t N) {
  constexpr int kMaxRows = 4;
  const int64_t groups = K / G;
  at::parallel_for(0, N, 16, [&](int64_t n_begin, int64_t n_end) {
    for (int64_t m0 = 0; m0 < num_rows; m0 += kMaxRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kMaxRows, num_rows - m0));
      for (int64_t n = n_begin; n < n_end; ++n) {
        const int8_t* qrow = q + n * K;
        const float* srow = scale + n * groups;
        const float* orow = offset ? offset + n * groups : nullptr;
        float result[kMaxRows];
#ifdef PS_AVX2
        __m256 acc[kMaxRows];
        for (int r = 0; r < kMaxRows; ++r) acc[r] = _mm256_setzero_ps();
        for (int64_t g = 0; g < groups; ++g) {
          const __m256 s = _mm256_set1_ps(srow[g]);
          const __m256 o = _mm256_set1_ps(orow ? orow[g] : 0.f);
          for (int j = 0; j < G; j += 8) {
            const int64_t k = g * G + j;
            const __m256 w = _mm256_fmadd_ps(load_codes8(qrow + k), s, o);
            for (int r = 0; r < rows; ++r)
              acc[r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + (m0 + r) * K + k), w, acc[r]);
          }
        }
        for (int r = 0; r < rows; ++r) result[r] = hsum(acc[r]);
#else
        for (int r = 0; r < rows; ++r) {
          float sum = 0.f;
          for (int64_t k = 0; k < K; ++k)
            sum += x[(m0 + r) * K + k] * (srow[k / G] * qrow[k] + (orow ? orow[k / G] : 0.f));
          result[r] = sum;
        }
#endif
        for (int r = 0; r < rows; ++r) y[(m0 + r) * N + n] = result[r] + (bias ? bias[n] : 0.f);
      }
    }
  });
}

// Many rows (prefill, big decode batches): dequantize a panel of 16 weight rows into a [K, 16]
// float buffer once, then run a 6x16 register-blocked kernel over all x rows against it.
constexpr int kPanel = 16;
constexpr int kRowTile = 6;

template <int G>
void dequant_panel(const int8_t* q, const float* scale, const float* offset, int64_t K, int64_t n0, int64_t N,
                   float* panel) {
  const int64_t groups = K / G;
  for (int c = 0; c < kPanel; ++c) {
    const int64_t n = n0 + c;
    if (n >= N) {
      for (int64_t k = 0; k < K; ++k) panel[k * kPanel + c] = 0.f;
      continue;
    }
    const int8_t* qrow = q + n * K;
    for (int64_t g = 0; g < groups; ++g) {
      const float s = scale[n * groups + g];
      const float o = offset ? offset[n * groups + g] : 0.f;
      for (int j = 0; j < G; ++j) panel[(g * G + j) * kPanel + c] = std::fma(static_cast<float>(qrow[g * G + j]), s, o);
    }
  }
}

template <int R>
void panel_kernel(const float* x, int64_t K, const float* panel, float* y, int64_t N, int64_t n0, int cols,
                  const float* bias) {
#ifdef PS_AVX2
  __m256 acc0[R], acc1[R];
  for (int r = 0; r < R; ++r) acc0[r] = acc1[r] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; ++k) {
    const __m256 w0 = _mm256_loadu_ps(panel + k * kPanel);
    const __m256 w1 = _mm256_loadu_ps(panel + k * kPanel + 8);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_broadcast_ss(x + r * K + k);
      acc0[r] = _mm256_fmadd_ps(xv, w0, acc0[r]);
      acc1[r] = _mm256_fmadd_ps(xv, w1, acc1[r]);
    }
  }
  for (int r = 0; r < R; ++r) {
    alignas(32) float out[kPanel];
    _mm256_store_ps(out, acc0[r]);
    _mm256_store_ps(out + 8, acc1[r]);
    for (int c = 0; c < cols; ++c) y[r * N + n0 + c] = out[c] + (bias ? bias[n0 + c] : 0.f);
  }
#else
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < cols; ++c) {
      float sum = 0.f;
      for (int64_t k = 0; k < K; ++k) sum += x[r * K + k] * panel[k * kPanel + c];
      y[r * N + n0 + c] = sum + (bias ? bias[n0 + c] : 0.f);
    }
#endif
}

template <int G>
void qlinear_panels(const float* x, int64_t num_rows, int64_t K, const int8_t* q, const float* scale,
                    const float* offset, const float* bias, float* y, int64_t N) {
  const int64_t num_panels = (N + kPanel - 1) / kPanel;
  at::parallel_for(0, num_panels, 1, [&](int64_t p_begin, int64_t p_end) {
    std::vector<float> panel(static_cast<size_t>(K) * kPanel);
    for (int64_t p = p_begin; p < p_end; ++p) {
      const int64_t n0 = p * kPanel;
      const int cols = static_cast<int>(std::min<int64_t>(kPanel, N - n0));
      dequant_panel<G>(q, scale, offset, K, n0, N, panel.data());
      int64_t m = 0;
      for (; m + kRowTile <= num_rows; m += kRowTile)
        panel_kernel<kRowTile>(x + m * K, K, panel.data(), y + m * N, N, n0, cols, bias);
      switch (num_rows - m) {
        case 5: panel_kernel<5>(x + m * K, K, panel.data(), y + m * N, N, n0, cols, bias); break;
        case 4: panel_kernel<4>(x + m * K, K, panel.data(), y + m * N, N, n0, cols, bias); break;
        case 3: panel_kernel<3>(x + m * K, K, panel.data(), y + m * N, N, n0, cols, bias); break;
        case 2: panel_kernel<2>(x + m * K, K, panel.data(), y + m * N, N, n0, cols, bias); break;
        case 1: panel_kernel<1>(x + m * K, K, panel.data(), y + m * N, N, n0, cols, bias); break;
        default: break;
      }
    }
  });
}

// Rows at or below this use the streaming path; above it the panel path amortises dequantization.
constexpr int64_t kStreamingMaxRows = 4;

at::Tensor qlinear(const at::Tensor& x, const at::Tensor& q, const at::Tensor& scale,
                   const c10::optional<at::Tensor>& offset, const c10::optional<at::Tensor>& bias,
                   int64_t group_size) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "qlinear: x must be contiguous float32");
  TORCH_CHECK(q.scalar_type() == at::kChar && q.is_contiguous() && q.dim() == 2, "qlinear: q must be int8 [N, K]");
  TORCH_CHECK(group_size == 16 || group_size == 32, "qlinear: group size must be 16 or 32");
  const int64_t N = q.size(0), K = q.size(1);
  TORCH_CHECK(x.size(-1) == K && K % group_size == 0, "qlinear: shape mismatch");
  const int64_t num_rows = x.numel() / K;
  auto out_shape = x.sizes().vec();
  out_shape.back() = N;
  at::Tensor y = at::empty(out_shape, x.options());
  const float* offset_ptr = offset && offset->defined() ? offset->data_ptr<float>() : nullptr;
  const float* bias_ptr = bias && bias->defined() ? bias->data_ptr<float>() : nullptr;
  auto run = [&](auto fn) {
    fn(x.data_ptr<float>(), num_rows, K, q.data_ptr<int8_t>(), scale.data_ptr<float>(), offset_ptr, bias_ptr,
       y.data_ptr<float>(), N);
  };
  if (num_rows <= kStreamingMaxRows) {
    group_size == 32 ? run(qlinear_rows<32>) : run(qlinear_rows<16>);
  } else {
    group_size == 32 ? run(qlinear_panels<32>) : run(qlinear_panels<16>);
  }
  return y;
}

// ---- attention ----------------------------------------------------------------------------------

// out[b, h] = softmax(q[b, h] . K[b]^T * scale) V[b] over the sequence's first context_lens[b] tokens
// (the last `window` of them when window > 0), K/V read through block_tables[b].
void paged_attention(at::Tensor& out, const at::Tensor& query, const at::Tensor& k_cache, const at::Tensor& v_cache,
                     const at::Tensor& block_tables, const at::Tensor& context_lens, double scale, int64_t window,
                     double softcap) {
  TORCH_CHECK(query.scalar_type() == at::kFloat && k_cache.scalar_type() == at::kFloat, "paged_attention: float32");
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
    std::vector<float> acc(group * head_dim);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / num_kv_heads, kvh = item % num_kv_heads;
      const int64_t len = lens[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t count = len - first;
      scores.assign(static_cast<size_t>(group * count), 0.f);
      const float* qg = q + (b * num_heads + kvh * group) * head_dim;
      for (int64_t t = 0; t < count; ++t) {
        const int64_t pos = first + t;
        const float* krow = kc + tables[b * max_blocks + pos / block_size] * block_stride +
                            (pos % block_size) * token_stride + kvh * head_dim;
        for (int64_t g = 0; g < group; ++g) {
          const float* qh = qg + g * head_dim;
          float dot = 0.f;
#ifdef PS_AVX2
          __m256 s = _mm256_setzero_ps();
          int64_t d = 0;
          for (; d + 8 <= head_dim; d += 8) s = _mm256_fmadd_ps(_mm256_loadu_ps(qh + d), _mm256_loadu_ps(krow + d), s);
          dot = hsum(s);
          for (; d < head_dim; ++d) dot += qh[d] * krow[d];
#else
          for (int64_t d = 0; d < head_dim; ++d) dot += qh[d] * krow[d];
#endif
          dot *= fscale;
          if (fcap > 0.f) dot = std::tanh(dot / fcap) * fcap;
          scores[g * count + t] = dot;
        }
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t g = 0; g < group; ++g) {
        float* row = scores.data() + g * count;
        const float peak = *std::max_element(row, row + count);
        float total = 0.f;
        for (int64_t t = 0; t < count; ++t) total += (row[t] = std::exp(row[t] - peak));
        const float inv = 1.f / total;
        for (int64_t t = 0; t < count; ++t) row[t] *= inv;
      }
      for (int64_t t = 0; t < count; ++t) {
        const int64_t pos = first + t;
        const float* vrow = vc + tables[b * max_blocks + pos / block_size] * block_stride +
                            (pos % block_size) * token_stride + kvh * head_dim;
        for (int64_t g = 0; g < group; ++g) {
          const float p = scores[g * count + t];
          float* a = acc.data() + g * head_dim;
#ifdef PS_AVX2
          const __m256 pv = _mm256_set1_ps(p);
          int64_t d = 0;
          for (; d + 8 <= head_dim; d += 8)
            _mm256_storeu_ps(a + d, _mm256_fmadd_ps(pv, _mm256_loadu_ps(vrow + d), _mm256_loadu_ps(a + d)));
          for (; d < head_dim; ++d) a[d] += p * vrow[d];
#else
          for (int64_t d = 0; d < head_dim; ++d) a[d] += p * vrow[d];
#endif
        }
      }
      std::copy(acc.begin(), acc.end(), o + (b * num_heads + kvh * group) * head_dim);
    }
  });
}

// ---- elementwise --------------------------------------------------------------------------------

inline void rms_norm_row(const float* in, const float* weight, float* out, int64_t hidden, float eps) {
  double sum = 0.0;
  for (int64_t i = 0; i < hidden; ++i) sum += static_cast<double>(in[i]) * in[i];
  const float inv = 1.f / std::sqrt(static_cast<float>(sum / hidden) + eps);
  for (int64_t i = 0; i < hidden; ++i) out[i] = in[i] * inv * weight[i];
}

// residual += x; x = rms_norm(residual) * weight   (both in place)
void add_rms_norm(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
  const int64_t hidden = x.size(-1), rows = x.numel() / hidden;
  float* xp = x.data_ptr<float>();
  float* rp = residual.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* xr = xp + r * hidden;
      float* rr = rp + r * hidden;
      for (int64_t i = 0; i < hidden; ++i) rr[i] += xr[i];
      rms_norm_row(rr, w, xr, hidden, static_cast<float>(eps));
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  at::Tensor out = at::empty_like(x);
  const int64_t hidden = x.size(-1), rows = x.numel() / hidden;
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float* w = weight.data_ptr<float>();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) rms_norm_row(xp + r * hidden, w, op + r * hidden, hidden, static_cast<float>(eps));
  });
  return out;
}

// Rotate x [T, heads * head_dim] in place ("rotate half" layout) with per-token cos/sin
// [T, head_dim / 2]. Rows may be strided (x is usually a slice of the fused qkv output).
void rotary_inplace(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t head_dim) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.stride(1) == 1, "rotary_inplace: float32 rows");
  const int64_t num_tokens = x.size(0), heads = x.size(1) / head_dim, half = head_dim / 2;
  float* xp = x.data_ptr<float>();
  const float* cp = cos.data_ptr<float>();
  const float* sp = sin.data_ptr<float>();
  const int64_t stride = x.stride(0);
  at::parallel_for(0, num_tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const float* c = cp + t * half;
      const float* s = sp + t * half;
      for (int64_t h = 0; h < heads; ++h) {
        float* head = xp + t * stride + h * head_dim;
        for (int64_t i = 0; i < half; ++i) {
          const float a = head[i], b = head[i + half];
          head[i] = a * c[i] - b * s[i];
          head[i + half] = b * c[i] + a * s[i];
        }
      }
    }
  });
}

template <bool kGelu>
at::Tensor gated_act(const at::Tensor& x) {
  const int64_t width = x.size(-1) / 2, rows = x.numel() / (2 * width);
  auto shape = x.sizes().vec();
  shape.back() = width;
  at::Tensor out = at::empty(shape, x.options());
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, 4, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float* gate = xp + r * 2 * width;
      const float* up = gate + width;
      float* o = op + r * width;
      for (int64_t i = 0; i < width; ++i) {
        const float g = gate[i];
        float a;
        if (kGelu) {
          const float inner = 0.7978845608028654f * (g + 0.044715f * g * g * g);
          a = 0.5f * g * (1.f + std::tanh(inner));
        } else {
          a = g / (1.f + std::exp(-g));
        }
        o[i] = a * up[i];
      }
    }
  });
  return out;
}

at::Tensor silu_and_mul(const at::Tensor& x) { return gated_act<false>(x); }
at::Tensor gelu_and_mul(const at::Tensor& x) { return gated_act<true>(x); }

}  // namespace

TORCH_LIBRARY(pagedserve, m) {
  m.def("qlinear(Tensor x, Tensor q, Tensor scale, Tensor? offset, Tensor? bias, int group_size) -> Tensor");
  m.def("paged_attention(Tensor(a!) out, Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, float scale, int window, float softcap) -> ()");
  m.def("add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rotary_inplace(Tensor(a!) x, Tensor cos, Tensor sin, int head_dim) -> ()");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("gelu_and_mul(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(pagedserve, CPU, m) {
  m.impl("qlinear", &qlinear);
  m.impl("paged_attention", &paged_attention);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rms_norm", &rms_norm);
  m.impl("rotary_inplace", &rotary_inplace);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("gelu_and_mul", &gelu_and_mul);
}
