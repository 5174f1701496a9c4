// CPU kernels of pagedserve (float32 activations), registered as torch.ops.pagedserve.*.
//
// qlinear:          y = x @ dequant(W)^T (+ bias), W kept as int8 codes with a float scale and offset
//                   per group of 16 or 32 weights: w = scale * q + offset. Every GGUF block format we
//                   load (Q4_0/1, Q5_0/1, Q8_0, Q4_K, Q5_K, Q6_K) is exactly this after unpacking.
//                   Few rows stream the packed weights with x rounded to int16 per 32 values (decode); many rows
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

// Codes come as int8 (one per byte) or as 4-bit (32-weight groups of 16 bytes: byte j holds weight j
// in its low nibble and weight j + 16 in its high nibble, GGUF's own Q4 layout; values 0..15).
template <int BITS>
inline float code_at(const uint8_t* row, int64_t k) {
  if (BITS == 8) return static_cast<float>(reinterpret_cast<const int8_t*>(row)[k]);
  const int64_t group = k / 32, j = k % 32;
  const uint8_t byte = row[group * 16 + (j & 15)];
  return static_cast<float>(j < 16 ? (byte & 0x0F) : (byte >> 4));
}

#ifdef PS_AVX2
// One group of G codes -> G / 8 float vectors.
template <int G, int BITS>
inline void decode_group(const uint8_t* q, __m256* out) {
  if (BITS == 8) {
    for (int j = 0; j < G / 8; ++j) out[j] = load_codes8(reinterpret_cast<const int8_t*>(q) + 8 * j);
  } else {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
    const __m128i mask = _mm_set1_epi8(0x0F);
    const __m128i lo = _mm_and_si128(bytes, mask);
    const __m128i hi = _mm_and_si128(_mm_srli_epi16(bytes, 4), mask);
    out[0] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
    out[1] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
    out[2] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
    out[3] = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
  }
}
#endif

#ifdef PS_AVX2
// Codes 8j..8j+7 of a group.
template <int BITS>
inline __m256 decode8(const uint8_t* group, int j) {
  if (BITS == 8) return load_codes8(reinterpret_cast<const int8_t*>(group) + 8 * j);
  __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(group + 8 * (j & 1)));
  if (j >= 2) bytes = _mm_srli_epi16(bytes, 4);
  bytes = _mm_and_si128(bytes, _mm_set1_epi8(0x0F));
  return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(bytes));
}
#endif

// Few rows (decode): stream each weight row once, dequantize in registers, dot with every x row.
// R rows of x against NB weight rows at a time, so R * NB (at least 4) FMA chains are in flight.
template <int G, int BITS, int R, int NB>
void qlinear_rows_tile(const float* x, int64_t K, const uint8_t* q, const float* scale, const float* offset,
                       const float* bias, float* y, int64_t N, int64_t n_begin, int64_t n_end) {
  const int64_t groups = K / G, row_bytes = K * BITS / 8, group_bytes = G * BITS / 8;
  int64_t n = n_begin;
#ifdef PS_AVX2
  for (; n + NB <= n_end; n += NB) {
    __m256 acc[R][NB];
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < NB; ++b) acc[r][b] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      __m256 s[NB], o[NB];
      const uint8_t* qg[NB];
      for (int b = 0; b < NB; ++b) {
        s[b] = _mm256_set1_ps(scale[(n + b) * groups + g]);
        o[b] = _mm256_set1_ps(offset ? offset[(n + b) * groups + g] : 0.f);
        qg[b] = q + (n + b) * row_bytes + g * group_bytes;
      }
#pragma GCC unroll 4
      for (int j = 0; j < G / 8; ++j) {
        __m256 xv[R];
        for (int r = 0; r < R; ++r) xv[r] = _mm256_loadu_ps(x + r * K + g * G + 8 * j);
        for (int b = 0; b < NB; ++b) {
          const __m256 w = _mm256_fmadd_ps(decode8<BITS>(qg[b], j), s[b], o[b]);
          for (int r = 0; r < R; ++r) acc[r][b] = _mm256_fmadd_ps(xv[r], w, acc[r][b]);
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < NB; ++b) y[r * N + n + b] = hsum(acc[r][b]) + (bias ? bias[n + b] : 0.f);
  }
#endif
  for (; n < n_end; ++n) {   // leftover rows (and the portable path)
    const uint8_t* qrow = q + n * row_bytes;
    for (int r = 0; r < R; ++r) {
      float sum = 0.f;
      for (int64_t k = 0; k < K; ++k) {
        const int64_t g = n * groups + k / G;
        sum += x[r * K + k] * (scale[g] * code_at<BITS>(qrow, k) + (offset ? offset[g] : 0.f));
      }
      y[r * N + n] = sum + (bias ? bias[n] : 0.f);
    }
  }
}

template <int G, int BITS>
void qlinear_rows(const float* x, int64_t num_rows, int64_t K, const uint8_t* q, const float* scale,
                  const float* offset, const float* bias, float* y, int64_t N) {
  // NOTE: chunks of whole 4-row tiles, so no chunk ends in a scalar leftover row unless N does.
  at::parallel_for(0, N, 16, [&](int64_t n_begin, int64_t n_end) {
    for (int64_t m = 0; m < num_rows; m += 4) {
      const float* xm = x + m * K;
      float* ym = y + m * N;
      switch (std::min<int64_t>(4, num_rows - m)) {
        case 4: qlinear_rows_tile<G, BITS, 4, 1>(xm, K, q, scale, offset, bias, ym, N, n_begin, n_end); break;
        case 3: qlinear_rows_tile<G, BITS, 3, 2>(xm, K, q, scale, offset, bias, ym, N, n_begin, n_end); break;
        case 2: qlinear_rows_tile<G, BITS, 2, 2>(xm, K, q, scale, offset, bias, ym, N, n_begin, n_end); break;
        default: qlinear_rows_tile<G, BITS, 1, 4>(xm, K, q, scale, offset, bias, ym, N, n_begin, n_end); break;
      }
    }
  });
}

#ifdef PS_AVX2
// Decode with int16 activations: each 32-value block of a row of x becomes int16 codes with one float
// scale (relative error ~1e-5 of the block's largest value, far below the weights' own), and the dot
// with a weight group runs on integer multiply-adds (madd_epi16), about half the instructions of
// widening every weight to float. (int8 activations, as llama.cpp uses, would be cheaper still, but
// a 32-value block holding one of these models' outlier channels loses the rest of its values.)
struct Q16Rows {
  std::vector<int16_t> codes;  // [rows, K]
  std::vector<float> scale;    // [rows, K / 32]
  std::vector<float> sum;      // [rows, K / 32]: scale * sum of the block's codes, for weight offsets
};

inline Q16Rows quantize_rows_q16(const float* x, int64_t rows, int64_t K) {
  const int64_t blocks = K / 32;
  Q16Rows out{std::vector<int16_t>(rows * K), std::vector<float>(rows * blocks), std::vector<float>(rows * blocks)};
  const __m256 sign_bit = _mm256_set1_ps(-0.f);
  const __m256i ones = _mm256_set1_epi16(1);
  for (int64_t i = 0; i < rows * blocks; ++i) {
    const float* xb = x + i * 32;
    __m256 v[4], amax = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j) {
      v[j] = _mm256_loadu_ps(xb + 8 * j);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_bit, v[j]));
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    const float max_abs = _mm_cvtss_f32(m);
    const float d = max_abs / 32767.f, inv = max_abs > 0.f ? 32767.f / max_abs : 0.f;
    __m256i q[4];
    for (int j = 0; j < 4; ++j)
      q[j] = _mm256_cvtps_epi32(_mm256_mul_ps(v[j], _mm256_set1_ps(inv)));   // round to nearest
    // int32 -> int16; the in-lane pack interleaves 64-bit quarters, the permute restores the order.
    const __m256i lo = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xD8);
    const __m256i hi = _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2], q[3]), 0xD8);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.codes.data() + i * 32), lo);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out.codes.data() + i * 32 + 16), hi);
    const __m256i pair_sums = _mm256_add_epi32(_mm256_madd_epi16(lo, ones), _mm256_madd_epi16(hi, ones));
    out.scale[i] = d;
    out.sum[i] = d * hsum(_mm256_cvtepi32_ps(pair_sums));
  }
  return out;
}

// The 32 weight codes of a group widened to int16: codes 0..15 in w[0], 16..31 in w[1].
template <int BITS>
inline void load_group16(const uint8_t* q, __m256i* w) {
  if (BITS == 8) {
    const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q));
    w[0] = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(bytes));
    w[1] = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(bytes, 1));
  } else {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
    const __m128i mask = _mm_set1_epi8(0x0F);
    w[0] = _mm256_cvtepu8_epi16(_mm_and_si128(bytes, mask));
    w[1] = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(bytes, 4), mask));
  }
}

// Integer dot of a weight group with 32 int16 activations, as 8 partial sums (as floats). No
// overflow: 32 products of |code| <= 128 and |x| <= 32767 stay within int32.
inline __m256 dot32(const __m256i* w, const int16_t* x) {
  const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16));
  return _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_madd_epi16(w[0], x0), _mm256_madd_epi16(w[1], x1)));
}

template <int BITS, int R, int NB>
void qlinear_q16_tile(const int16_t* xc, const float* xd, const float* xs, int64_t K, const uint8_t* q,
                      const float* scale, const float* offset, const float* bias, float* y, int64_t N,
                      int64_t n_begin, int64_t n_end) {
  const int64_t groups = K / 32, row_bytes = K * BITS / 8, group_bytes = 32 * BITS / 8;
  int64_t n = n_begin;
  for (; n + NB <= n_end; n += NB) {
    __m256 acc[R][NB];
    float off[R][NB] = {};
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < NB; ++b) acc[r][b] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      __m256i w[NB][2];
      for (int b = 0; b < NB; ++b) load_group16<BITS>(q + (n + b) * row_bytes + g * group_bytes, w[b]);
      for (int r = 0; r < R; ++r) {
        const int16_t* xg = xc + r * K + g * 32;
        for (int b = 0; b < NB; ++b) {
          const float d = scale[(n + b) * groups + g] * xd[r * groups + g];
          acc[r][b] = _mm256_fmadd_ps(dot32(w[b], xg), _mm256_set1_ps(d), acc[r][b]);
          if (offset) off[r][b] += offset[(n + b) * groups + g] * xs[r * groups + g];
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < NB; ++b) y[r * N + n + b] = hsum(acc[r][b]) + off[r][b] + (bias ? bias[n + b] : 0.f);
  }
  for (; n < n_end; ++n) {   // leftover weight rows
    for (int r = 0; r < R; ++r) {
      float sum = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        __m256i w[2];
        load_group16<BITS>(q + n * row_bytes + g * group_bytes, w);
        sum += hsum(dot32(w, xc + r * K + g * 32)) * scale[n * groups + g] * xd[r * groups + g];
        if (offset) sum += offset[n * groups + g] * xs[r * groups + g];
      }
      y[r * N + n] = sum + (bias ? bias[n] : 0.f);
    }
  }
}

template <int BITS>
void qlinear_rows_q16(const float* x, int64_t num_rows, int64_t K, const uint8_t* q, const float* scale,
                      const float* offset, const float* bias, float* y, int64_t N) {
  const Q16Rows xq = quantize_rows_q16(x, num_rows, K);
  const int64_t groups = K / 32;
  at::parallel_for(0, N, 16, [&](int64_t n_begin, int64_t n_end) {
    for (int64_t m = 0; m < num_rows; m += 4) {
      const int16_t* xc = xq.codes.data() + m * K;
      const float* xd = xq.scale.data() + m * groups;
      const float* xs = xq.sum.data() + m * groups;
      float* ym = y + m * N;
      switch (std::min<int64_t>(4, num_rows - m)) {
        case 4: qlinear_q16_tile<BITS, 4, 1>(xc, xd, xs, K, q, scale, offset, bias, ym, N, n_begin, n_end); break;
        case 3: qlinear_q16_tile<BITS, 3, 2>(xc, xd, xs, K, q, scale, offset, bias, ym, N, n_begin, n_end); break;
        case 2: qlinear_q16_tile<BITS, 2, 2>(xc, xd, xs, K, q, scale, offset, bias, ym, N, n_begin, n_end); break;
        default: qlinear_q16_tile<BITS, 1, 4>(xc, xd, xs, K, q, scale, offset, bias, ym, N, n_begin, n_end); break;
      }
    }
  });
}
#endif

// Many rows (prefill, big decode batches): dequantize the weights a chunk of output rows at a time
// into a float buffer small enough to stay in cache, and let torch's GEMM (MKL) multiply. The
// dequantization costs a few operations per weight; the GEMM does 2 * num_rows per weight.
template <int G, int BITS>
void dequant_rows(const uint8_t* q, const float* scale, const float* offset, int64_t K, int64_t n_begin,
                  int64_t n_end, float* out) {
  const int64_t groups = K / G, row_bytes = K * BITS / 8, group_bytes = G * BITS / 8;
  at::parallel_for(n_begin, n_end, 8, [&](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const uint8_t* qrow = q + n * row_bytes;
      float* out_row = out + (n - n_begin) * K;
      for (int64_t g = 0; g < groups; ++g) {
        const float s = scale[n * groups + g];
        const float o = offset ? offset[n * groups + g] : 0.f;
#ifdef PS_AVX2
        const __m256 sv = _mm256_set1_ps(s), ov = _mm256_set1_ps(o);
        __m256 codes[G / 8];
        decode_group<G, BITS>(qrow + g * group_bytes, codes);
        for (int j = 0; j < G / 8; ++j) _mm256_storeu_ps(out_row + g * G + 8 * j, _mm256_fmadd_ps(codes[j], sv, ov));
#else
        for (int j = 0; j < G; ++j) out_row[g * G + j] = s * code_at<BITS>(qrow, g * G + j) + o;
#endif
      }
    }
  });
}

constexpr int64_t kChunkBytes = 1 << 21;

template <int G, int BITS>
void qlinear_chunks(const at::Tensor& x2d, const uint8_t* q, const float* scale, const float* offset,
                    const float* bias, at::Tensor& y2d) {
  const int64_t K = x2d.size(1), N = y2d.size(1);
  const int64_t chunk = std::max<int64_t>(16, kChunkBytes / (K * static_cast<int64_t>(sizeof(float))));
  at::Tensor buffer = at::empty({std::min(chunk, N), K}, x2d.options());
  for (int64_t n0 = 0; n0 < N; n0 += chunk) {
    const int64_t n1 = std::min(N, n0 + chunk);
    at::Tensor w = buffer.narrow(0, 0, n1 - n0);
    dequant_rows<G, BITS>(q, scale, offset, K, n0, n1, w.data_ptr<float>());
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

template <int G, int BITS>
at::Tensor qlinear_impl(const at::Tensor& x, const uint8_t* q, const float* scale, const float* offset,
                        const float* bias, int64_t N) {
  const int64_t K = x.size(-1), num_rows = x.numel() / K;
  auto out_shape = x.sizes().vec();
  out_shape.back() = N;
  at::Tensor y = at::empty(out_shape, x.options());
  if (num_rows <= kStreamingMaxRows) {
#ifdef PS_AVX2
    if (G == 32) {   // 16-weight groups (Q6_K) keep the float path
      qlinear_rows_q16<BITS>(x.data_ptr<float>(), num_rows, K, q, scale, offset, bias, y.data_ptr<float>(), N);
      return y;
    }
#endif
    qlinear_rows<G, BITS>(x.data_ptr<float>(), num_rows, K, q, scale, offset, bias, y.data_ptr<float>(), N);
  } else {
    at::Tensor y2d = y.view({num_rows, N});
    qlinear_chunks<G, BITS>(x.reshape({num_rows, K}), q, scale, offset, bias, y2d);
  }
  return y;
}

at::Tensor qlinear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                   const c10::optional<at::Tensor>& offset, const c10::optional<at::Tensor>& bias,
                   int64_t group_size, int64_t bits) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous(), "qlinear: x must be contiguous float32");
  TORCH_CHECK(codes.is_contiguous() && codes.dim() == 2 && codes.element_size() == 1, "qlinear: codes [N, bytes]");
  TORCH_CHECK((bits == 8 && (group_size == 16 || group_size == 32)) || (bits == 4 && group_size == 32),
              "qlinear: 8-bit codes in groups of 16 or 32, or 4-bit codes in groups of 32");
  const int64_t N = codes.size(0), K = x.size(-1);
  TORCH_CHECK(codes.size(1) * 8 == K * bits && K % group_size == 0, "qlinear: shape mismatch");
  const uint8_t* q = reinterpret_cast<const uint8_t*>(codes.data_ptr());
  const float* s = scale.data_ptr<float>();
  const float* o = offset && offset->defined() ? offset->data_ptr<float>() : nullptr;
  const float* b = bias && bias->defined() ? bias->data_ptr<float>() : nullptr;
  if (bits == 4) return qlinear_impl<32, 4>(x, q, s, o, b, N);
  return group_size == 32 ? qlinear_impl<32, 8>(x, q, s, o, b, N) : qlinear_impl<16, 8>(x, q, s, o, b, N);
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
// (the last `window` of them when window > 0), K/V read through block_tables[b]. Keys and values are
// walked block by block (no division per token), each row read once for all heads of its group.
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

// ---- one fused decoder layer --------------------------------------------------------------------

// One Llama-family decoder layer for a batch of decode tokens (one query per sequence), float32
// activations and packed weights: everything a Python layer would do in ~20 torch calls, in one.
//   weights: input_norm, post_norm, then (codes, scales, offsets?, bias?) for qkv, o, gate_up and
//            down, then q_norm?, k_norm? (Qwen3); ints: (group, bits) of the four projections, then
//            num_heads, num_kv_heads, head_dim, window (0: none); floats: eps, attention scale.
// `residual` is updated in place (on the first layer it is filled with `hidden`); returns the
// layer's MLP output, to be added to the residual by the next layer's input norm.
at::Tensor llama_decode_layer(at::Tensor& hidden, at::Tensor& residual, bool first_layer,
                              const c10::List<c10::optional<at::Tensor>>& weights, at::IntArrayRef ints,
                              at::ArrayRef<double> floats, const at::Tensor& cos, const at::Tensor& sin,
                              at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slot_mapping,
                              const at::Tensor& block_tables, const at::Tensor& context_lens) {
  auto w = [&](int i) -> c10::optional<at::Tensor> { return weights.get(i); };
  auto linear = [&](const at::Tensor& x, int first, int meta) {
    return qlinear(x, *w(first), *w(first + 1), w(first + 2), w(first + 3), ints[meta], ints[meta + 1]);
  };
  const int64_t num_heads = ints[8], num_kv_heads = ints[9], head_dim = ints[10], window = ints[11];
  const double eps = floats[0], scale = floats[1];
  const int64_t batch = hidden.size(0), q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;

  at::Tensor x = hidden;
  if (first_layer) {
    residual.copy_(hidden);
    x = rms_norm(hidden, *w(0), eps);
  } else {
    add_rms_norm(x, residual, *w(0), eps);
  }
  at::Tensor qkv = linear(x, 2, 0);                                       // [batch, q + 2 kv]
  at::Tensor q = qkv.narrow(1, 0, q_size), k = qkv.narrow(1, q_size, kv_size);
  if (w(18).has_value()) {                                                // Qwen3: per-head q/k norms
    q = rms_norm(q.contiguous().view({-1, head_dim}), *w(18), eps).view({batch, q_size});
    k = rms_norm(k.contiguous().view({-1, head_dim}), *w(19), eps).view({batch, kv_size});
  }
  rotary_inplace(q, cos, sin, head_dim);
  rotary_inplace(k, cos, sin, head_dim);
  const float* kp = k.data_ptr<float>();
  const float* vp = qkv.data_ptr<float>() + q_size + kv_size;
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  for (int64_t b = 0; b < batch; ++b) {
    std::copy(kp + b * k.stride(0), kp + b * k.stride(0) + kv_size, kc + slots[b] * kv_size);
    std::copy(vp + b * qkv.stride(0), vp + b * qkv.stride(0) + kv_size, vc + slots[b] * kv_size);
  }
  at::Tensor attn = at::empty({batch, num_heads, head_dim}, hidden.options());
  paged_attention(attn, q.contiguous().view({batch, num_heads, head_dim}), k_cache, v_cache, block_tables,
                  context_lens, scale, window, 0.0);
  at::Tensor out = linear(attn.view({batch, q_size}), 6, 2);
  add_rms_norm(out, residual, *w(1), eps);
  return linear(silu_and_mul(linear(out, 10, 4)), 14, 6);
}

}  // namespace

TORCH_LIBRARY(pagedserve, m) {
  m.def("qlinear(Tensor x, Tensor codes, Tensor scale, Tensor? offset, Tensor? bias, int group_size, int bits) -> Tensor");
  m.def("paged_attention(Tensor(a!) out, Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, float scale, int window, float softcap) -> ()");
  m.def("add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rotary_inplace(Tensor(a!) x, Tensor cos, Tensor sin, int head_dim) -> ()");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("llama_decode_layer(Tensor(a!) hidden, Tensor(b!) residual, bool first_layer, Tensor?[] weights, int[] ints, "
        "float[] floats, Tensor cos, Tensor sin, Tensor(c!) k_cache, Tensor(d!) v_cache, Tensor slot_mapping, "
        "Tensor block_tables, Tensor context_lens) -> Tensor");
  m.def("gelu_and_mul(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(pagedserve, CPU, m) {
  m.impl("qlinear", &qlinear);
  m.impl("paged_attention", &paged_attention);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("rms_norm", &rms_norm);
  m.impl("rotary_inplace", &rotary_inplace);
  m.impl("silu_and_mul", &silu_and_mul);
  m.impl("llama_decode_layer", &llama_decode_layer);
  m.impl("gelu_and_mul", &gelu_and_mul);
}
