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
// Decode at concurrency 1: each block of G values of x (the weights' own groups) as int8 codes with
// one float scale d, x ~ d * (code + residual / 254), both int8, so a chunk of weights meets x in two
// integer multiply-adds per 4 weights (vpdpbusd on AVX-512 VNNI, maddubs + madd on AVX2) rather than
// being widened to float. Each value is off by at most max|block| / (127 * 508), about int16's
// rounding. NOTE: one level, as llama.cpp rounds x, decoded 10-15% faster here but not close enough: greedy
// SmolLM2 and Gemma 3 parted from transformers' tokens on 4 and 2 of 11 prompts within 32 tokens.
//
// Weight rows are read one at a time, so the prefetcher sees one stream: four interleaved rows (the
// float path's tiles) read a 67 MB Q8_0 weight from memory at ~12 GB/s here, one row at ~24 GB/s.
//
// NOTE: a block holding an outlier channel is multiplied in float instead. Gemma 3's normed activations
// hold channels hundreds of times the rest (290 beside ~0.2), and its weights on those channels are
// small, so the values beside the outlier carry the result, and steps of 290 / (127 * 254) would lose
// them. A block is kept in float when its largest |x| exceeds kOutlierRatio times its mean |x|
// (Gaussian blocks of 32 stay near 3; one outlier of 290 among 0.2s is ~30).
constexpr float kOutlierRatio = 6.f;
constexpr float kResidualScale = 254.f;

#if defined(PS_AVX512)
constexpr int kChunk = 64;   // weights per integer dot: one zmm of bytes
#else
constexpr int kChunk = 32;   // one ymm
#endif
constexpr int kLanes = kChunk / 4;   // int32 lanes, each the sum of 4 byte products
// AVX-512 multiplies 8-bit weights as unsigned (code + 128, one XOR) and subtracts 128 * sum(x codes)
// per block after; AVX2 moves the weights' signs onto x instead (sign_epi8, no correction).
constexpr bool kShiftedCodes = kChunk == 64;

// Where x's value k sits among the int8 codes: each chunk holds its values in the order its weight
// register does. 8-bit chunks and AVX2's 4-bit ones (one group: low nibbles, weights 0-15, then high
// ones, 16-31) are in x's order; AVX-512's 4-bit chunk is two groups' 32 code bytes as [low nibbles of
// both | high nibbles of both], x's 16-value quarters 0, 2, 1, 3. The map is its own inverse.
template <int BITS>
inline int64_t chunk_offset(int64_t k) {
  if (BITS == 8 || kChunk == 32) return k;
  const int64_t quarter = (k >> 4) & 3;
  return (k & ~int64_t{63}) | ((quarter == 1 ? 2 : quarter == 2 ? 1 : quarter) << 4) | (k & 15);
}

// One row of x, quantized. Reused per thread: a decode step quantizes ~120 rows.
struct I8Row {
  std::vector<int8_t> codes;    // [chunks * kChunk] in each chunk's register order; 0 in float blocks
  std::vector<int8_t> residual; // like codes: (x / d - code) * kResidualScale, rounded
  std::vector<float> lane_d;    // [chunks * kLanes]: each lane's block scale d (/ 16: see load_chunk)
  std::vector<float> shift;     // [blocks]: 128 * d * sum(code + residual / 254), when kShiftedCodes
  std::vector<float> sum;       // [blocks]: the block's sum of x (exact), for weight offsets
  std::vector<int64_t> exact;   // blocks multiplied in float
  std::vector<float> d;         // scratch: d per block
};

// 8 int32 in [-127, 127] -> 8 bytes.
inline void store_bytes8(__m256i v, int8_t* out) {
  const __m128i v16 = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm_packs_epi16(v16, v16));
}

template <int G, int BITS>
const I8Row& quantize_row_i8(const float* x, int64_t K) {
  static thread_local I8Row out;
  const int64_t blocks = K / G, chunks = (K + kChunk - 1) / kChunk;
  out.codes.assign(chunks * kChunk, 0);
  out.residual.assign(chunks * kChunk, 0);
  out.lane_d.assign(chunks * kLanes, 0.f);
  out.shift.assign(blocks, 0.f);
  out.sum.resize(blocks);
  out.d.assign(blocks, 0.f);
  out.exact.clear();
  const __m256 sign_bit = _mm256_set1_ps(-0.f);
  for (int64_t b = 0; b < blocks; ++b) {
    const float* xb = x + b * G;
    __m256 amax = _mm256_setzero_ps(), aabs = _mm256_setzero_ps(), total = _mm256_setzero_ps();
    for (int j = 0; j < G; j += 8) {
      const __m256 v = _mm256_loadu_ps(xb + j), a = _mm256_andnot_ps(sign_bit, v);
      amax = _mm256_max_ps(amax, a);
      aabs = _mm256_add_ps(aabs, a);
      total = _mm256_add_ps(total, v);
    }
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(amax), _mm256_extractf128_ps(amax, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    const float max_abs = _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
    out.sum[b] = hsum(total);
    if (max_abs == 0.f) continue;
    if (max_abs > kOutlierRatio * hsum(aabs) / G) {
      out.exact.push_back(b);
      continue;
    }
    out.d[b] = max_abs / 127.f;
    const __m256 inv = _mm256_set1_ps(127.f / max_abs);
    __m256 codes_sum = _mm256_setzero_ps();
    for (int j = 0; j < G; j += 8) {
      // NOTE: rounding to nearest (the default MXCSR mode); |scaled| <= 127, and scaled - code is exact.
      const __m256 scaled = _mm256_mul_ps(_mm256_loadu_ps(xb + j), inv);
      const __m256 code = _mm256_round_ps(scaled, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      const __m256 rest = _mm256_round_ps(_mm256_mul_ps(_mm256_sub_ps(scaled, code), _mm256_set1_ps(kResidualScale)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      codes_sum = _mm256_add_ps(codes_sum, _mm256_fmadd_ps(rest, _mm256_set1_ps(1.f / kResidualScale), code));
      // 8 values never straddle a 16-value quarter, so they stay together in the chunk order.
      const int64_t at = chunk_offset<BITS>(b * G + j);
      store_bytes8(_mm256_cvtps_epi32(code), out.codes.data() + at);
      store_bytes8(_mm256_cvtps_epi32(rest), out.residual.data() + at);
    }
    out.shift[b] = 128.f * out.d[b] * hsum(codes_sum);
  }
  for (int64_t c = 0; c < chunks; ++c) {
    for (int l = 0; l < kLanes; ++l) {
      const int64_t k = chunk_offset<BITS>(c * kChunk + 4 * l);   // the x value lane l starts with
      if (k < K) out.lane_d[c * kLanes + l] = out.d[k / G] * (BITS == 4 && kChunk == 64 && l >= 8 ? 1.f / 16 : 1.f);
    }
  }
  return out;
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

#if defined(PS_AVX512)
// A chunk's weights as unsigned bytes for vpdpbusd; `count` < 64 for the last, partial one.
template <int BITS>
inline __m512i load_chunk(const uint8_t* q, int count) {
  if (BITS == 4) {
    const __m256i bytes = count == 64 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q))
                                      : _mm256_maskz_loadu_epi8((1u << (count / 2)) - 1, q);
    // NOTE: the high nibbles are masked in place, 16x their value (at most 240, still a byte), and
    // lane_d carries the 1/16: one AND decodes both halves.
    const __m512i mask = _mm512_inserti64x4(_mm512_set1_epi8(0x0F), _mm256_set1_epi8(static_cast<char>(0xF0)), 1);
    return _mm512_and_si512(_mm512_broadcast_i64x4(bytes), mask);
  }
  const __m512i bytes = count == 64 ? _mm512_loadu_si512(q) : _mm512_maskz_loadu_epi8((uint64_t{1} << count) - 1, q);
  return _mm512_xor_si512(bytes, _mm512_set1_epi8(static_cast<char>(0x80)));
}

// The weight scales of a chunk's 64 / G blocks, one per lane.
template <int G, int BITS>
inline __m512 chunk_scales(const float* s, int count) {
  const int n = count / G;
  const __m128 v = n == 2 ? _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(s)))
                   : n == 4 ? _mm_loadu_ps(s) : _mm_maskz_loadu_ps(static_cast<__mmask8>((1u << n) - 1), s);
  const __m512i block_of_lane = BITS == 4 ? _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0)
                                : G == 32 ? _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0)
                                          : _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  return _mm512_permutexvar_ps(block_of_lane, _mm512_castps128_ps512(v));
}

// One weight row's chunk times x's: 16 float partial sums (before the block scales).
template <int G, int BITS>
inline __m512 chunk_dot(const uint8_t* q, const int8_t* xc, const int8_t* xr, int count) {
  const __m512i w = load_chunk<BITS>(q, count), zero = _mm512_setzero_si512();
  const __m512i hi = _mm512_dpbusd_epi32(zero, w, _mm512_loadu_si512(xc));
  const __m512i lo = _mm512_dpbusd_epi32(zero, w, _mm512_loadu_si512(xr));
  return _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), _mm512_set1_ps(1.f / kResidualScale), _mm512_cvtepi32_ps(hi));
}
#else
template <int G, int BITS>
inline __m256 chunk_scales(const float* s, int count) {
  if (G == 32) return _mm256_broadcast_ss(s);
  const __m128 v = count == 32 ? _mm_castpd_ps(_mm_load_sd(reinterpret_cast<const double*>(s))) : _mm_load_ss(s);
  return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(v), _mm256_set_epi32(1, 1, 1, 1, 0, 0, 0, 0));
}

template <int G, int BITS>
inline __m256 chunk_dot(const uint8_t* q, const int8_t* xc, const int8_t* xr, int count) {
  __m256i xh = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xc));
  __m256i xl = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xr));
  __m256i w;
  if (BITS == 4) {
    const __m128i bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q));
    w = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(bytes, 4), bytes), _mm256_set1_epi8(0x0F));
  } else {
    const __m256i signed_w = count == 32 ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q))
                                         : _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q)));
    w = _mm256_abs_epi8(signed_w);
    xh = _mm256_sign_epi8(xh, signed_w);
    xl = _mm256_sign_epi8(xl, signed_w);
  }
  // Byte pairs sum to at most 2 * 128 * 127: maddubs does not saturate.
  const __m256i ones = _mm256_set1_epi16(1);
  const __m256i hi = _mm256_madd_epi16(_mm256_maddubs_epi16(w, xh), ones);
  const __m256i lo = _mm256_madd_epi16(_mm256_maddubs_epi16(w, xl), ones);
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(lo), _mm256_set1_ps(1.f / kResidualScale), _mm256_cvtepi32_ps(hi));
}
#endif

// The float side of the one-row path, one register of kLanes floats on either ISA.
#if defined(PS_AVX512)
using Floats = __m512;
inline Floats zero_floats() { return _mm512_setzero_ps(); }
inline Floats load_floats(const float* p) { return _mm512_loadu_ps(p); }
inline Floats broadcast_floats(float v) { return _mm512_set1_ps(v); }
inline Floats add_floats(Floats a, Floats b) { return _mm512_add_ps(a, b); }
inline Floats mul_floats(Floats a, Floats b) { return _mm512_mul_ps(a, b); }
inline Floats fma_floats(Floats a, Floats b, Floats c) { return _mm512_fmadd_ps(a, b, c); }
inline float reduce_floats(Floats a) { return _mm512_reduce_add_ps(a); }
template <int BITS>
inline Floats decode_floats(const uint8_t* group, int j) { return decode16<BITS>(group, j); }
#else
using Floats = __m256;
inline Floats zero_floats() { return _mm256_setzero_ps(); }
inline Floats load_floats(const float* p) { return _mm256_loadu_ps(p); }
inline Floats broadcast_floats(float v) { return _mm256_set1_ps(v); }
inline Floats add_floats(Floats a, Floats b) { return _mm256_add_ps(a, b); }
inline Floats mul_floats(Floats a, Floats b) { return _mm256_mul_ps(a, b); }
inline Floats fma_floats(Floats a, Floats b, Floats c) { return _mm256_fmadd_ps(a, b, c); }
inline float reduce_floats(Floats a) { return hsum(a); }
template <int BITS>
inline Floats decode_floats(const uint8_t* group, int j) { return decode8<BITS>(group, j); }
#endif

// Weight rows [n_begin, n_end) against the quantized row.
template <int G, int BITS>
void qlinear_i8_rows(const I8Row& xq, const float* x, int64_t K, const uint8_t* q, const float* scale,
                     const float* offset, const float* bias, float* y, int64_t n_begin, int64_t n_end) {
  const int64_t blocks = K / G, row_bytes = K * BITS / 8, chunk_bytes = kChunk * BITS / 8;
  const int64_t full = K / kChunk;
  const int tail = static_cast<int>(K - full * kChunk);
  const int8_t* xc = xq.codes.data();
  const int8_t* xr = xq.residual.data();
  const float* xd = xq.lane_d.data();
  for (int64_t n = n_begin; n < n_end; ++n) {
    const uint8_t* qn = q + n * row_bytes;
    const float* sn = scale + n * blocks;
    // Two accumulators: consecutive chunks' multiply-adds do not wait on each other.
    Floats acc[2] = {zero_floats(), zero_floats()};
    auto step = [&](int64_t c, int count, Floats& into) {
      const Floats w_scales = chunk_scales<G, BITS>(sn + c * (kChunk / G), count);
      const Floats dot = chunk_dot<G, BITS>(qn + c * chunk_bytes, xc + c * kChunk, xr + c * kChunk, count);
      into = fma_floats(dot, mul_floats(w_scales, load_floats(xd + c * kLanes)), into);
    };
    int64_t c = 0;
    for (; c + 2 <= full; c += 2) {
      step(c, kChunk, acc[0]);
      step(c + 1, kChunk, acc[1]);
    }
    if (c < full) step(c, kChunk, acc[0]);
    if (tail) step(full, tail, acc[1]);
    for (const int64_t e : xq.exact) {   // float blocks, kLanes weights at a time
      const uint8_t* qe = qn + e * G * BITS / 8;
      for (int j = 0; j < G / kLanes; ++j) {
        const Floats wx = mul_floats(decode_floats<BITS>(qe, j), load_floats(x + e * G + kLanes * j));
        acc[j & 1] = fma_floats(wx, broadcast_floats(sn[e]), acc[j & 1]);
      }
    }
    float total = reduce_floats(add_floats(acc[0], acc[1]));
    if (offset) total += dot_floats(offset + n * blocks, xq.sum.data(), blocks);
    if (BITS == 8 && kShiftedCodes) total -= dot_floats(sn, xq.shift.data(), blocks);
    y[n] = total + (bias ? bias[n] : 0.f);
  }
}

template <int G, int BITS>
void qlinear_row_i8(const float* x, int64_t K, const uint8_t* q, const float* scale, const float* offset,
                    const float* bias, float* y, int64_t N) {
  const I8Row& xq = quantize_row_i8<G, BITS>(x, K);
  at::parallel_for(0, N, 16, [&](int64_t n_begin, int64_t n_end) {
    qlinear_i8_rows<G, BITS>(xq, x, K, q, scale, offset, bias, y, n_begin, n_end);
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
    // NOTE: integer dot products for one row only. From two rows on, a weight chunk decoded to float
    // once serves every row with one FMA per 16 weights, fewer instructions than two integer dots
    // per row, and exact float.
    if (num_rows == 1) {
      qlinear_row_i8<G, BITS>(x.data_ptr<float>(), K, q, scale, offset, bias, y.data_ptr<float>(), N);
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
