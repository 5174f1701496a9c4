// qlinear (see qlinear.h): the decode path streams packed weights, the prefill path dequantizes
// cache-sized chunks for torch's GEMM.
#include "qlinear.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "common.h"

namespace pagedserve {
namespace {

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

#ifdef PS_AVX512
// Codes 16j..16j+15 of a group (G = 16 or 32; 4-bit groups: j = 0 the low nibbles, j = 1 the high ones).
template <int BITS>
inline __m512 decode16(const uint8_t* group, int j) {
  if (BITS == 8) {
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(group + 16 * j))));
  }
  __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(group));
  if (j == 1) bytes = _mm_srli_epi16(bytes, 4);
  return _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(bytes, _mm_set1_epi8(0x0F))));
}
#endif

// Few rows (decode): stream each weight row once, dequantize in registers, dot with every x row.
// R rows of x against NB weight rows at a time, so R * NB (at least 4) FMA chains are in flight.
template <int G, int BITS, int R, int NB>
void qlinear_rows_tile(const float* x, int64_t K, const uint8_t* q, const float* scale, const float* offset,
                       const float* bias, float* y, int64_t N, int64_t n_begin, int64_t n_end) {
  const int64_t groups = K / G, row_bytes = K * BITS / 8, group_bytes = G * BITS / 8;
  int64_t n = n_begin;
#if defined(PS_AVX512)
  // 16 codes per instruction: half the decode and FMA instructions of the AVX2 loop below.
  for (; n + NB <= n_end; n += NB) {
    __m512 acc[R][NB];
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      __m512 s[NB], o[NB];
      const uint8_t* qg[NB];
      for (int b = 0; b < NB; ++b) {
        s[b] = _mm512_set1_ps(scale[(n + b) * groups + g]);
        o[b] = _mm512_set1_ps(offset ? offset[(n + b) * groups + g] : 0.f);
        qg[b] = q + (n + b) * row_bytes + g * group_bytes;
      }
      for (int j = 0; j < G / 16; ++j) {
        __m512 xv[R];
        for (int r = 0; r < R; ++r) xv[r] = _mm512_loadu_ps(x + r * K + g * G + 16 * j);
        for (int b = 0; b < NB; ++b) {
          const __m512 w = _mm512_fmadd_ps(decode16<BITS>(qg[b], j), s[b], o[b]);
          for (int r = 0; r < R; ++r) acc[r][b] = _mm512_fmadd_ps(xv[r], w, acc[r][b]);
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < NB; ++b) y[r * N + n + b] = _mm512_reduce_add_ps(acc[r][b]) + (bias ? bias[n + b] : 0.f);
  }
#elif defined(PS_AVX2)
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
  // NOTE: each 4-row tile of x reads the weights again, so the tiles take turns over blocks of weight
  // rows small enough to stay in L2 (~256 KB); over a whole thread's share, every tile after the first
  // streamed it from memory again (a 16-row step of Gemma 3's 262k-row head read it 4 times).
  // Blocks of whole 4-row groups, so only a chunk's last block can end in scalar leftover rows.
  // (8-row tiles, 8 x 2 accumulators on AVX-512, were faster alone but 10-20% slower in the model.)
  const int64_t row_bytes = K * BITS / 8;
  const int64_t block = std::max<int64_t>(4, (int64_t{1} << 18) / row_bytes / 4 * 4);
  at::parallel_for(0, N, 16, [&](int64_t n_begin, int64_t n_end) {
    for (int64_t n0 = n_begin; n0 < n_end; n0 += block) {
      const int64_t n1 = std::min(n_end, n0 + block);
      for (int64_t m = 0; m < num_rows; m += 4) {
        const float* xm = x + m * K;
        float* ym = y + m * N;
        switch (std::min<int64_t>(4, num_rows - m)) {
          case 4: qlinear_rows_tile<G, BITS, 4, 1>(xm, K, q, scale, offset, bias, ym, N, n0, n1); break;
          case 3: qlinear_rows_tile<G, BITS, 3, 2>(xm, K, q, scale, offset, bias, ym, N, n0, n1); break;
          case 2: qlinear_rows_tile<G, BITS, 2, 2>(xm, K, q, scale, offset, bias, ym, N, n0, n1); break;
          default: qlinear_rows_tile<G, BITS, 1, 4>(xm, K, q, scale, offset, bias, ym, N, n0, n1); break;
        }
      }
    }
  });
}

#ifdef PS_AVX2
// Decode with int16 activations: each 32-value block of a row of x becomes two int16 code vectors
// with one float scale d, x = d * (hi + lo / 32768), and the dot with a weight group runs on integer
// multiply-adds (madd_epi16), about half the instructions of widening every weight to float.
//
// NOTE: two levels, not one. hi alone rounds each value by up to d / 2 = max|block| / 65534, and
// Gemma 3's blocks hold outlier channels hundreds of times the other values: those lost ~1% each,
// and its logprobs drifted 6e-4 from the float result. With lo the error is max|block| / 2^31,
// below float32's own rounding of the values. (int8 activations, as llama.cpp uses, are cheaper but
// lose far more in such a block.)
struct Q16Rows {
  std::vector<int16_t> hi;     // [rows, K]
  std::vector<int16_t> lo;     // [rows, K]: the residual x / d - hi, times 32768
  std::vector<float> scale;    // [rows, K / 32]: d
  std::vector<float> sum;      // [rows, K / 32]: the block's sum of x, for weight offsets
};

// 32 int32 -> 32 int16 in order (the in-lane pack interleaves 64-bit quarters; the permute restores them).
inline void pack32_epi16(const __m256i* q, int16_t* out) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out), _mm256_permute4x64_epi64(_mm256_packs_epi32(q[0], q[1]), 0xD8));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16),
                      _mm256_permute4x64_epi64(_mm256_packs_epi32(q[2], q[3]), 0xD8));
}

inline Q16Rows quantize_rows_q16(const float* x, int64_t rows, int64_t K) {
  const int64_t blocks = K / 32;
  Q16Rows out{std::vector<int16_t>(rows * K), std::vector<int16_t>(rows * K), std::vector<float>(rows * blocks),
              std::vector<float>(rows * blocks)};
  const __m256 sign_bit = _mm256_set1_ps(-0.f);
  for (int64_t i = 0; i < rows * blocks; ++i) {
    const float* xb = x + i * 32;
    __m256 v[4], amax = _mm256_setzero_ps(), total = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j) {
      v[j] = _mm256_loadu_ps(xb + 8 * j);
      amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign_bit, v[j]));
      total = _mm256_add_ps(total, v[j]);
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_movehdup_ps(m));
    const float max_abs = _mm_cvtss_f32(m);
    const float d = max_abs / 32767.f, inv = max_abs > 0.f ? 32767.f / max_abs : 0.f;
    __m256i hi[4], lo[4];
    for (int j = 0; j < 4; ++j) {
      const __m256 scaled = _mm256_mul_ps(v[j], _mm256_set1_ps(inv));     // |scaled| <= 32767
      const __m256 rounded = _mm256_round_ps(scaled, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      hi[j] = _mm256_cvtps_epi32(rounded);
      // |scaled - rounded| <= 1/2 (exact in float), so lo fits int16 with room to spare.
      lo[j] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_sub_ps(scaled, rounded), _mm256_set1_ps(32768.f)));
    }
    pack32_epi16(hi, out.hi.data() + i * 32);
    pack32_epi16(lo, out.lo.data() + i * 32);
    out.scale[i] = d;
    out.sum[i] = hsum(total);
  }
  return out;
}

template <int BITS>
inline void load_group16(const uint8_t* q, __m256i* w) {
  // NOTE: each widening reads memory directly (one shuffle, no extract); for 4 bits the bytes are
  // widened whole and split in 16-bit lanes, where the high nibble needs no mask.
  if (BITS == 8) {
    w[0] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
    w[1] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + 16)));
  } else {
    const __m256i bytes = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
    w[0] = _mm256_and_si256(bytes, _mm256_set1_epi16(0x0F));
    w[1] = _mm256_srli_epi16(bytes, 4);
  }
}

// Integer dot of a weight group with 32 int16 activations, as 8 int32 partial sums. No overflow:
// 32 products of |code| <= 128 and |x| <= 32767 stay within int32.
inline __m256i dot32_epi32(const __m256i* w, const int16_t* x) {
  const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x));
  const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16));
#if defined(PS_AVX512)
  return _mm256_dpwssd_epi32(_mm256_madd_epi16(w[0], x0), w[1], x1);
#elif defined(__AVXVNNI__)
  return _mm256_dpwssd_avx_epi32(_mm256_madd_epi16(w[0], x0), w[1], x1);
#else
  return _mm256_add_epi32(_mm256_madd_epi16(w[0], x0), _mm256_madd_epi16(w[1], x1));
#endif
}

#ifdef PS_AVX512
// One weight group as 32 int16 in one register (4 bits: the low nibbles, then the high ones).
template <int BITS>
inline __m512i load_group32(const uint8_t* q) {
  if (BITS == 8) return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(q)));
  const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
  // NOTE: the 16-bit shift pulls the next byte's low nibble into the high half of each byte; the mask
  // after widening drops it.
  const __m512i wide = _mm512_cvtepu8_epi16(_mm256_set_m128i(_mm_srli_epi16(bytes, 4), bytes));
  return _mm512_and_si512(wide, _mm512_set1_epi16(0x0F));
}

// The dot of a weight group with a two-level activation block, as 16 float partial sums: one VNNI
// multiply-add per level (each int32 lane sums two products, exact).
inline __m512 dot32_512(__m512i w, const int16_t* hi, const int16_t* lo) {
  const __m512i zero = _mm512_setzero_si512();
  const __m512i h = _mm512_dpwssd_epi32(zero, w, _mm512_loadu_si512(hi));
  const __m512i l = _mm512_dpwssd_epi32(zero, w, _mm512_loadu_si512(lo));
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(l), _mm512_set1_ps(1.f / 32768.f), _mm512_cvtepi32_ps(h));
}
#endif

// The dot of a weight group with a two-level activation block (hi + lo / 32768), as 8 float partial sums.
inline __m256 dot32(const __m256i* w, const int16_t* hi, const int16_t* lo) {
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot32_epi32(w, lo)), _mm256_set1_ps(1.f / 32768.f),
                         _mm256_cvtepi32_ps(dot32_epi32(w, hi)));
}

// sum of a[i] * b[i]: the weight offsets' share, once per output rather than once per group.
inline float dot_floats(const float* a, const float* b, int64_t count) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float total = hsum(acc);
  for (; i < count; ++i) total += a[i] * b[i];
  return total;
}

template <int BITS, int R, int NB>
void qlinear_q16_tile(const int16_t* xc, const int16_t* xl, const float* xd, const float* xs, int64_t K, const uint8_t* q,
                      const float* scale, const float* offset, const float* bias, float* y, int64_t N,
                      int64_t n_begin, int64_t n_end) {
  const int64_t groups = K / 32, row_bytes = K * BITS / 8, group_bytes = 32 * BITS / 8;
  int64_t n = n_begin;
#ifdef PS_AVX512
  for (; n + NB <= n_end; n += NB) {
    __m512 acc[R][NB];
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < NB; ++b) acc[r][b] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      __m512i w[NB];
      __m512 ws[NB];
      for (int b = 0; b < NB; ++b) {
        w[b] = load_group32<BITS>(q + (n + b) * row_bytes + g * group_bytes);
        ws[b] = _mm512_set1_ps(scale[(n + b) * groups + g]);
      }
      for (int r = 0; r < R; ++r) {
        const __m512 xdv = _mm512_set1_ps(xd[r * groups + g]);
        for (int b = 0; b < NB; ++b)
          acc[r][b] = _mm512_fmadd_ps(dot32_512(w[b], xc + r * K + g * 32, xl + r * K + g * 32),
                                      _mm512_mul_ps(ws[b], xdv), acc[r][b]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < NB; ++b)
        y[r * N + n + b] = _mm512_reduce_add_ps(acc[r][b]) +
                           (offset ? dot_floats(offset + (n + b) * groups, xs + r * groups, groups) : 0.f) +
                           (bias ? bias[n + b] : 0.f);
  }
#endif
  for (; n + NB <= n_end; n += NB) {
    __m256 acc[R][NB];
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < NB; ++b) acc[r][b] = _mm256_setzero_ps();
    for (int64_t g = 0; g < groups; ++g) {
      __m256i w[NB][2];
      __m256 ws[NB];
      for (int b = 0; b < NB; ++b) {
        load_group16<BITS>(q + (n + b) * row_bytes + g * group_bytes, w[b]);
        ws[b] = _mm256_broadcast_ss(scale + (n + b) * groups + g);   // a load, no shuffle
      }
      for (int r = 0; r < R; ++r) {
        const int16_t* xg = xc + r * K + g * 32;
        const __m256 xdv = _mm256_broadcast_ss(xd + r * groups + g);
        for (int b = 0; b < NB; ++b)
          acc[r][b] = _mm256_fmadd_ps(dot32(w[b], xg, xl + r * K + g * 32), _mm256_mul_ps(ws[b], xdv), acc[r][b]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int b = 0; b < NB; ++b)
        y[r * N + n + b] = hsum(acc[r][b]) + (offset ? dot_floats(offset + (n + b) * groups, xs + r * groups, groups) : 0.f) +
                           (bias ? bias[n + b] : 0.f);
  }
  for (; n < n_end; ++n) {   // leftover weight rows
    for (int r = 0; r < R; ++r) {
      float sum = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        __m256i w[2];
        load_group16<BITS>(q + n * row_bytes + g * group_bytes, w);
        sum += hsum(dot32(w, xc + r * K + g * 32, xl + r * K + g * 32)) * scale[n * groups + g] * xd[r * groups + g];
        if (offset) sum += offset[n * groups + g] * xs[r * groups + g];
      }
      y[r * N + n] = sum + (bias ? bias[n] : 0.f);
    }
  }
}

// One row (decode at concurrency 1): four weight rows at a time, so four dot chains are in flight.
template <int BITS>
void qlinear_row_q16(const float* x, int64_t K, const uint8_t* q, const float* scale, const float* offset,
                     const float* bias, float* y, int64_t N) {
  const Q16Rows xq = quantize_rows_q16(x, 1, K);
  at::parallel_for(0, N, 16, [&](int64_t n_begin, int64_t n_end) {
    qlinear_q16_tile<BITS, 1, 4>(xq.hi.data(), xq.lo.data(), xq.scale.data(), xq.sum.data(), K, q, scale, offset,
                                 bias, y, N, n_begin, n_end);
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

// Rows at or below this use the streaming path; above it dequantize-and-GEMM wins. Measured on both
// variants (2-core EPYC; Gemma 3's and SmolLM2's MLP and head shapes, 4- and 8-bit): streaming 1.2-2x
// faster at 24-64 rows, even at 128, mixed at 256. At 16 it had sent decode batches of 17+ sequences to
// the GEMM path, dequantizing every weight each step (Gemma 3 at batch 64: 107 tok/s, now 182).
constexpr int64_t kStreamingMaxRows = 128;

template <int G, int BITS>
at::Tensor qlinear_impl(const at::Tensor& x, const uint8_t* q, const float* scale, const float* offset,
                        const float* bias, int64_t N) {
  const int64_t K = x.size(-1), num_rows = x.numel() / K;
  auto out_shape = x.sizes().vec();
  out_shape.back() = N;
  at::Tensor y = at::empty(out_shape, x.options());
  if (num_rows <= kStreamingMaxRows) {
#ifdef PS_AVX2
    // NOTE: int16 activations for one row only. From two rows on, decoding each weight group to
    // float once and reusing it for every row costs fewer instructions than two int16 dots per
    // row (SmolLM2 layer, 4 rows: 530 vs 646 us here), and is exact float.
    if (G == 32 && num_rows == 1) {   // 16-weight groups (Q6_K) keep the float path
      qlinear_row_q16<BITS>(x.data_ptr<float>(), K, q, scale, offset, bias, y.data_ptr<float>(), N);
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

// Multiplies without checking: every caller has checked the weights (once, or per call) and x.
at::Tensor qlinear_unchecked(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                           const c10::optional<at::Tensor>& offset, const c10::optional<at::Tensor>& bias,
                           int64_t group_size, int64_t bits) {
  const int64_t N = codes.size(0);
  const uint8_t* q = reinterpret_cast<const uint8_t*>(codes.data_ptr());
  const float* s = scale.data_ptr<float>();
  const float* o = offset && offset->defined() ? offset->data_ptr<float>() : nullptr;
  const float* b = bias && bias->defined() ? bias->data_ptr<float>() : nullptr;
  if (bits == 4) return qlinear_impl<32, 4>(x, q, s, o, b, N);
  return group_size == 32 ? qlinear_impl<32, 8>(x, q, s, o, b, N) : qlinear_impl<16, 8>(x, q, s, o, b, N);
}

// Weight checks, shared by the op (each call) and PackedLinear (once). Returns in_features.
int64_t check_packed(const char* op, const at::Tensor& codes, const at::Tensor& scales,
                     const c10::optional<at::Tensor>& offsets, const c10::optional<at::Tensor>& bias,
                     int64_t group_size, int64_t bits) {
  TORCH_CHECK((bits == 8 && (group_size == 16 || group_size == 32)) || (bits == 4 && group_size == 32), op,
              ": 8-bit codes in groups of 16 or 32, or 4-bit codes in groups of 32; got bits=", bits,
              ", group_size=", group_size);
  check_tensor(codes, op, "codes", bits == 8 ? at::kChar : at::kByte, 2);
  const int64_t out_features = codes.size(0), in_features = codes.size(1) * 8 / bits;
  TORCH_CHECK(out_features > 0 && in_features > 0, op, ": codes must not be empty, got shape ", codes.sizes());
  TORCH_CHECK(in_features % group_size == 0, op, ": in_features ", in_features, " must be a multiple of group_size ",
              group_size);
  check_tensor(scales, op, "scales", at::kFloat, 2);
  check_size(scales, 0, out_features, op, "scales");
  check_size(scales, 1, in_features / group_size, op, "scales");
  if (offsets && offsets->defined()) {
    check_tensor(*offsets, op, "offsets", at::kFloat, 2);
    TORCH_CHECK(offsets->sizes() == scales.sizes(), op, ": offsets must have the shape of scales ", scales.sizes(),
                ", got ", offsets->sizes());
  }
  if (bias && bias->defined()) {
    check_tensor(*bias, op, "bias", at::kFloat, 1);
    check_size(*bias, 0, out_features, op, "bias");
  }
  return in_features;
}

void check_activations(const char* op, const at::Tensor& x, int64_t in_features) {
  TORCH_CHECK(x.defined(), op, ": x is missing");
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu(), op, ": x must be float32 on the CPU, got ",
              x.scalar_type(), " on ", x.device());
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features, op, ": x must be [..., ", in_features, "], got shape ",
              x.sizes());
  TORCH_CHECK(x.is_contiguous(), op, ": x must be contiguous");
}

}  // namespace

at::Tensor qlinear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                   const c10::optional<at::Tensor>& offset, const c10::optional<at::Tensor>& bias,
                   int64_t group_size, int64_t bits) {
  const int64_t in_features = check_packed("qlinear", codes, scale, offset, bias, group_size, bits);
  check_activations("qlinear", x, in_features);
  return qlinear_unchecked(x, codes, scale, offset, bias, group_size, bits);
}

PackedLinear::PackedLinear(at::Tensor codes_, at::Tensor scales_, c10::optional<at::Tensor> offsets_,
                           c10::optional<at::Tensor> bias_, int64_t group_size_, int64_t bits_)
    : codes(std::move(codes_)), scales(std::move(scales_)),
      offsets(offsets_ && offsets_->defined() ? std::move(offsets_) : c10::nullopt),
      bias(bias_ && bias_->defined() ? std::move(bias_) : c10::nullopt), group_size(group_size_), bits(bits_) {
  in_features = check_packed("PackedLinear", codes, scales, offsets, bias, group_size, bits);
  out_features = codes.size(0);
}

at::Tensor PackedLinear::forward(const at::Tensor& x) const {
  check_activations("PackedLinear", x, in_features);
  return qlinear_unchecked(x, codes, scales, offsets, bias, group_size, bits);
}

}  // namespace pagedserve
