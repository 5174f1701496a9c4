// CPU kernels of pagedserve (float32 activations), registered as torch.ops.pagedserve.*.
//
// qlinear:          y = x @ dequant(W)^T (+ bias), W kept as int8 codes with a float scale and offset
//                   per group of 16 or 32 weights: w = scale * q + offset. Every GGUF block format we
//                   load (Q4_0/1, Q5_0/1, Q8_0, Q4_K, Q5_K, Q6_K) is exactly this after unpacking.
//                   Few rows stream the packed weights (decode is memory-bound); many rows
//                   dequantize cache-sized chunks and use torch's GEMM (prefill is compute-bound).
// paged_attention:  one query token per sequence, reading K/V in place through the block table.
// add_rms_norm, rms_norm, rotary_inplace, silu_and_mul, gelu_and_mul: fused elementwise work that
//                   would otherwise cost several torch ops (and Python dispatches) each.
//
// Built at first use with -march=native (torch.utils.cpp_extension), so AVX2/AVX-512 paths follow
// the machine; parallelism uses torch's own thread pool (at::parallel_for).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
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

// Horizontal sums of 8 vectors at once: lane i of the result is the sum of v[i].
inline __m256 hsum8(const __m256* v) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(v[0], v[1]), _mm256_hadd_ps(v[2], v[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(v[4], v[5]), _mm256_hadd_ps(v[6], v[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}

// exp(x) to ~1 ulp of float (Cephes' polynomial); inputs below -87 give 0.
inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.3f), hi = _mm256_set1_ps(88.3f);
  const __m256 too_small = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  __m256 fx = _mm256_floor_ps(_mm256_fmadd_ps(x, _mm256_set1_ps(1.44269504088896341f), _mm256_set1_ps(0.5f)));
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500E-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073E-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894E-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459E-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201E-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.f)));
  const __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvttps_epi32(fx), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(too_small, _mm256_mul_ps(y, _mm256_castsi256_ps(pow2)));
}
#endif

// out[i] = exp(in[i] - shift); returns the sum of out.
inline float exp_shifted(const float* in, float* out, int64_t count, float shift) {
  float total = 0.f;
  int64_t i = 0;
#ifdef PS_AVX2
  const __m256 sv = _mm256_set1_ps(shift);
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= count; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(in + i), sv));
    _mm256_storeu_ps(out + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  total = hsum(acc);
#endif
  for (; i < count; ++i) total += (out[i] = std::exp(in[i] - shift));
  return total;
}

// ---- qlinear ------------------------------------------------------------------------------------

// Few rows (decode): stream each weight row once, dequantize in registers, dot with every x row.
// Two accumulators per x row keep two FMA chains in flight.
template <int G, int R>
void qlinear_rows_tile(const float* x, int64_t K, const int8_t* q, const float* scale, const float* offset,
                       const float* bias, float* y, int64_t N, int64_t n_begin, int64_t n_end) {
  const int64_t groups = K / G;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const int8_t* qrow = q + n * K;
    const float* srow = scale + n * groups;
    const float* orow = offset ? offset + n * groups : nullptr;
    float result[R];
#ifdef PS_AVX2
    __m256 acc[R][2];
    for (int r = 0; r < R; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      const __m256 s = _mm256_set1_ps(srow[g]);
      const __m256 o = _mm256_set1_ps(orow ? orow[g] : 0.f);
      const int8_t* qg = qrow + g * G;
      const float* xg = x + g * G;
#pragma GCC unroll 4
      for (int j = 0; j < G / 8; ++j) {
        const __m256 w = _mm256_fmadd_ps(load_codes8(qg + 8 * j), s, o);
        for (int r = 0; r < R; ++r)
          acc[r][j & 1] = _mm256_fmadd_ps(_mm256_loadu_ps(xg + r * K + 8 * j), w, acc[r][j & 1]);
      }
    }
    for (int r = 0; r < R; ++r) result[r] = hsum(_mm256_add_ps(acc[r][0], acc[r][1]));
#else
    for (int r = 0; r < R; ++r) {
      float sum = 0.f;
      for (int64_t k = 0; k < K; ++k)
        sum += x[r * K + k] * (srow[k / G] * qrow[k] + (orow ? orow[k / G] : 0.f));
      result[r] = sum;
    }
#endif
    for (int r = 0; r < R; ++r) y[r * N + n] = result[r] + (bias ? bias[n] : 0.f);
  }
}

template <int G>
void qlinear_rows(const float* x, int64_t num_rows, int64_t K, const int8_t* q, const float* scale,
                  const float* offset, const float* bias, float* y, int64_t N) {
  at::parallel_for(0, N, 16, [&](int64_t n_begin, int64_t n_end) {
    for (int64_t m = 0; m < num_rows; m += 4) {
      const float* xm = x + m * K;
      float* ym = y + m * N;
      switch (std::min<int64_t>(4, num_rows - m)) {
        case 4: qlinear_rows_tile<G, 4>(xm, K, q, scale, offset, bias, ym, N, n_begin, n_end); break;
        case 3: qlinear_rows_tile<G, 3>(xm, K, q, scale, offset, bias, ym, N, n_begin, n_end); break;
        case 2: qlinear_rows_tile<G, 2>(xm, K, q, scale, offset, bias, ym, N, n_begin, n_end); break;
        default: qlinear_rows_tile<G, 1>(xm, K, q, scale, offset, bias, ym, N, n_begin, n_end); break;
      }
    }
  });
}

// Many rows (prefill, big decode batches): dequantize the weights a chunk of output rows at a time
// into a float buffer small enough to stay in cache, and let torch's GEMM (MKL) multiply. The
// dequantization costs a few operations per weight; the GEMM does 2 * num_rows per weight.
template <int G>
void dequant_rows(const int8_t* q, const float* scale, const float* offset, int64_t K, int64_t n_begin,
                  int64_t n_end, float* out) {
  const int64_t groups = K / G;
  at::parallel_for(n_begin, n_end, 8, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int8_t* qrow = q + n * K;
      float* out_row = out + (n - n_begin) * K;
      for (int64_t g = 0; g < groups; ++g) {
        const float s = scale[n * groups + g];
        const float o = offset ? offset[n * groups + g] : 0.f;
#ifdef PS_AVX2
        const __m256 sv = _mm256_set1_ps(s), ov = _mm256_set1_ps(o);
        for (int j = 0; j < G; j += 8)
          _mm256_storeu_ps(out_row + g * G + j, _mm256_fmadd_ps(load_codes8(qrow + g * G + j), sv, ov));
#else
        for (int j = 0; j < G; ++j) out_row[g * G + j] = s * qrow[g * G + j] + o;
#endif
      }
    }
  });
}

constexpr int64_t kChunkBytes = 1 << 21;

template <int G>
void qlinear_chunks(const at::Tensor& x2d, const int8_t* q, const float* scale, const float* offset,
                    const float* bias, at::Tensor& y2d) {
  const int64_t K = x2d.size(1), N = y2d.size(1);
  const int64_t chunk = std::max<int64_t>(16, kChunkBytes / (K * static_cast<int64_t>(sizeof(float))));
  at::Tensor buffer = at::empty({std::min(chunk, N), K}, x2d.options());
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t n1 = std::min(N, n0 + chunk);
    at::Tensor w = buffer.narrow(0, 0, n1 - n0);
    dequant_rows<G>(q, scale, offset, K, n0, n1, w.data_ptr<float>());
    at::Tensor out = y2d.narrow(1, n0, n1 - n0);   // [num_rows, chunk], rows strided by N: GEMM's ldc
    if (bias) {
      at::addmm_out(out, at::from_blob(const_cast<float*>(bias) + n0, {n1 - n0}, x2d.options()), x2d, w.t());
    } else {
      at::mm_out(out, x2d, w.t());
    }
  }
}

// Rows at or below this use the streaming path; above it dequantize-and-GEMM wins.
constexpr int64_t kStreamingMaxRows = 16;

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
  const float* offset_ptr = offset && offset->defined() ? offset->data_ptr<float>() : nullptr;
  const float* bias_ptr = bias && bias->defined() ? bias->data_ptr<float>() : nullptr;
  if (num_rows <= kStreamingMaxRows) {
    at::Tensor y = at::empty(out_shape, x.options());
    auto run = [&](auto fn) {
      fn(x.data_ptr<float>(), num_rows, K, q.data_ptr<int8_t>(), scale.data_ptr<float>(), offset_ptr, bias_ptr,
         y.data_ptr<float>(), N);
    };
    group_size == 32 ? run(qlinear_rows<32>) : run(qlinear_rows<16>);
    return y;
  }
  const at::Tensor x2d = x.reshape({num_rows, K});
  at::Tensor y2d = at::empty({num_rows, N}, x.options());
  if (group_size == 32) {
    qlinear_chunks<32>(x2d, q.data_ptr<int8_t>(), scale.data_ptr<float>(), offset_ptr, bias_ptr, y2d);
  } else {
    qlinear_chunks<16>(x2d, q.data_ptr<int8_t>(), scale.data_ptr<float>(), offset_ptr, bias_ptr, y2d);
  }
  return y2d.view(out_shape);
}

// ---- attention ----------------------------------------------------------------------------------

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
    std::vector<float> acc(head_dim);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / num_kv_heads, kvh = item % num_kv_heads;
      const int64_t len = lens[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0;
      const int64_t count = len - first;
      scores.resize(static_cast<size_t>(group * (count + 8)));
      const float* qg = q + (b * num_heads + kvh * group) * head_dim;
      auto key_row = [&](const float* cache, int64_t pos) {
        return cache + tables[b * max_blocks + pos / block_size] * block_stride + (pos % block_size) * token_stride +
               kvh * head_dim;
      };
      // Scores, 8 positions at a time while they stay inside one block (rows are then evenly spaced).
      int64_t t = 0;
      while (t < count) {
        const int64_t pos = first + t;
        if ((pos % block_size) + 8 <= block_size && t + 8 <= count) {
          const float* keys = key_row(kc, pos);
          for (int64_t g = 0; g < group; ++g) dot8(qg + g * head_dim, keys, token_stride, head_dim, &scores[g * count + t]);
          t += 8;
          continue;
        }
        const float* krow = key_row(kc, pos);
        for (int64_t g = 0; g < group; ++g) {
          const float* qh = qg + g * head_dim;
          float dot = 0.f;
          for (int64_t d = 0; d < head_dim; ++d) dot += qh[d] * krow[d];
          scores[g * count + t] = dot;
        }
        ++t;
      }
      for (int64_t g = 0; g < group; ++g) {
        float* row = scores.data() + g * count;
        for (int64_t i = 0; i < count; ++i) {
          row[i] *= fscale;
          if (fcap > 0.f) row[i] = std::tanh(row[i] / fcap) * fcap;
        }
        const float peak = *std::max_element(row, row + count);
        const float inv = 1.f / exp_shifted(row, row, count, peak);
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t i = 0; i < count; ++i) {
          const float p = row[i] * inv;
          const float* vrow = key_row(vc, first + i);
          int64_t d = 0;
#ifdef PS_AVX2
          const __m256 pv = _mm256_set1_ps(p);
          for (; d + 8 <= head_dim; d += 8)
            _mm256_storeu_ps(&acc[d], _mm256_fmadd_ps(pv, _mm256_loadu_ps(vrow + d), _mm256_loadu_ps(&acc[d])));
#endif
          for (; d < head_dim; ++d) acc[d] += p * vrow[d];
        }
        std::copy(acc.begin(), acc.end(), o + (b * num_heads + kvh * group + g) * head_dim);
      }
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
      int64_t i = 0;
#ifdef PS_AVX2
      const __m256 one = _mm256_set1_ps(1.f);
      for (; i + 8 <= width; i += 8) {
        const __m256 g = _mm256_loadu_ps(gate + i);
        __m256 a;
        if (kGelu) {   // 0.5 g (1 + tanh(u)) = g - g / (exp(2u) + 1), u = sqrt(2/pi) (g + 0.044715 g^3)
          const __m256 u = _mm256_mul_ps(_mm256_set1_ps(1.5957691216057308f),
                                         _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), g),
                                                         _mm256_mul_ps(g, g), g));
          a = _mm256_sub_ps(g, _mm256_div_ps(g, _mm256_add_ps(exp8(u), one)));
        } else {       // g / (1 + exp(-g))
          a = _mm256_div_ps(g, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), g))));
        }
        _mm256_storeu_ps(o + i, _mm256_mul_ps(a, _mm256_loadu_ps(up + i)));
      }
#endif
      for (; i < width; ++i) {
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
