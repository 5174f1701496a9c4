// qlinear (see qlinear.h): x rounded to int8 levels against the packed codes (AVX-512 VNNI: every row
// count; AVX2: one row), or float x against weights decoded on the fly (AVX2 rows 2-128) or in
// cache-sized chunks for torch's GEMM (more rows).
#include "qlinear.h"

#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mm.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstring>
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
// NOTE: a block holding an outlier channel is not rounded with the rest. Gemma 3's normed activations
// hold channels hundreds of times the rest (290 beside ~0.2), and its weights on those channels are
// small, so the values beside the outlier carry the result, and steps of 290 / (127 * 508) would lose
// them. An outlier is one of a block's kMaxSpikes largest |x| above kOutlierRatio times the mean of
// the block's other |x| (past those four): the rest then round in steps under 1/2000 of that mean,
// finer than bfloat16 rounds each value (1/256). More than kMaxSpikes such values cannot be: the fifth
// would exceed 32 / 28 of itself. (The earlier rule, largest |x| above 6 times the mean of all, flagged
// 92% of SmolLM2's down_proj blocks at decode, whose inputs are heavy-tailed but hold nothing like
// 290 beside 0.2; this one flags 63%, and 5-9% of the other projections' blocks, mostly one value.)
constexpr float kOutlierRatio = 32.f;
constexpr int kMaxSpikes = 4;
static_assert(kOutlierRatio >= 32 - kMaxSpikes, "a block of 32 could hold more outliers than kMaxSpikes");
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

inline int32_t hsum_epi32(__m256i v) {
  __m128i x = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  x = _mm_add_epi32(x, _mm_shuffle_epi32(x, 0x4e));
  return _mm_cvtsi128_si32(_mm_add_epi32(x, _mm_shuffle_epi32(x, 0xb1)));
}

// 8 int32 in [-127, 127] -> 8 bytes.
inline void store_bytes8(__m256i v, int8_t* out) {
  const __m128i v16 = _mm_packs_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(out), _mm_packs_epi16(v16, v16));
}

// How one block of x was quantized: x ~ d * (code + residual / kResidualScale), except at its spikes,
// which keep their float values (their codes are 0), or the whole block in float (`exact`).
struct BlockCode {
  float d = 0.f;                  // 0 when the block is all zero (past its spikes) or exact
  float sum = 0.f;                // the block's exact sum, spikes included
  bool exact = false;
  int spikes = 0;
  int spike_at[kMaxSpikes];       // offsets in the block
  float spike_value[kMaxSpikes];
  int32_t code_sum = 0, rest_sum = 0;   // sums of the codes and of the residuals
};

inline float hmax(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

// Quantizes the G values at xb into codes / residual, 8 values j..j+7 at offset place(j) of each. A
// block holding outliers is exact, or with take_spikes (never exact) sets them aside and rounds the
// rest at the rest's own scale.
template <int G, typename Place>
BlockCode quantize_block(const float* xb, bool take_spikes, int8_t* codes, int8_t* residual, Place place) {
  BlockCode out;
  const __m256 sign_bit = _mm256_set1_ps(-0.f);
  __m256 a[G / 8];
  __m256 amax = _mm256_setzero_ps(), aabs = _mm256_setzero_ps(), total = _mm256_setzero_ps();
  for (int j = 0; j < G / 8; ++j) {
    const __m256 v = _mm256_loadu_ps(xb + 8 * j);
    a[j] = _mm256_andnot_ps(sign_bit, v);
    amax = _mm256_max_ps(amax, a[j]);
    aabs = _mm256_add_ps(aabs, a[j]);
    total = _mm256_add_ps(total, v);
  }
  float max_abs = hmax(amax);
  const float sum_abs = hsum(aabs);
  out.sum = hsum(total);
  // Blocks left unrounded (all zero, exact, nothing past the spikes) hold zero codes.
  auto unrounded = [&]() {
    for (int j = 0; j < G; j += 8) {
      _mm_storel_epi64(reinterpret_cast<__m128i*>(codes + place(j)), _mm_setzero_si128());
      _mm_storel_epi64(reinterpret_cast<__m128i*>(residual + place(j)), _mm_setzero_si128());
    }
    return out;
  };
  if (max_abs == 0.f) return unrounded();
  const float* values = xb;   // what is rounded: xb, or past spikes `rest`
  float rest[G];
  // The four largest can sum to at most 4 * max_abs: below this bound no value is an outlier (Gaussian
  // blocks, most of them), without looking for the four.
  if (max_abs > kOutlierRatio * (sum_abs - kMaxSpikes * max_abs) / (G - kMaxSpikes)) {
    // The largest |x| one at a time, each masked to -1 once found.
    auto take_largest = [&](float* value) {
      __m256 m = a[0];
      for (int j = 1; j < G / 8; ++j) m = _mm256_max_ps(m, a[j]);
      const float largest = hmax(m);
      int at = 0;
      for (int j = 0; j < G / 8; ++j) {
        const int hits = _mm256_movemask_ps(_mm256_cmp_ps(a[j], _mm256_set1_ps(largest), _CMP_EQ_OQ));
        if (hits) {
          at = 8 * j + __builtin_ctz(hits);
          a[j] = _mm256_blendv_ps(a[j], _mm256_set1_ps(-1.f), _mm256_castsi256_ps(_mm256_cmpeq_epi32(
                     _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(at - 8 * j))));
          break;
        }
      }
      *value = largest;
      return at;
    };
    int top_at[kMaxSpikes];
    float top[kMaxSpikes], top_sum = 0.f;
    for (int i = 0; i < kMaxSpikes; ++i) {
      top_at[i] = take_largest(&top[i]);
      top_sum += top[i];
    }
    const float limit = kOutlierRatio * (sum_abs - top_sum) / (G - kMaxSpikes);
    while (out.spikes < kMaxSpikes && top[out.spikes] > limit) ++out.spikes;
    if (out.spikes > 0 && !take_spikes) {
      out.spikes = 0;
      out.exact = true;
      return unrounded();
    }
    if (out.spikes > 0) {
      std::memcpy(rest, xb, sizeof(rest));
      values = rest;
    }
    for (int i = 0; i < out.spikes; ++i) {
      out.spike_at[i] = top_at[i];
      out.spike_value[i] = rest[top_at[i]];
      rest[top_at[i]] = 0.f;
    }
    if (out.spikes == kMaxSpikes) {
      take_largest(&max_abs);
    } else if (out.spikes > 0) {
      max_abs = top[out.spikes];
    }
    if (max_abs == 0.f) return unrounded();   // nothing past the spikes
  }
  out.d = max_abs / 127.f;
  const __m256 inv = _mm256_set1_ps(127.f / max_abs);
  __m256i codes_sum = _mm256_setzero_si256(), rest_sum = _mm256_setzero_si256();
  for (int j = 0; j < G; j += 8) {
    // NOTE: rounding to nearest (the default MXCSR mode); |scaled| <= 127, and scaled - code is exact.
    const __m256 scaled = _mm256_mul_ps(_mm256_loadu_ps(values + j), inv);
    const __m256 code = _mm256_round_ps(scaled, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_sub_ps(scaled, code), _mm256_set1_ps(kResidualScale)),
                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m256i ci = _mm256_cvtps_epi32(code), ri = _mm256_cvtps_epi32(r);
    codes_sum = _mm256_add_epi32(codes_sum, ci);
    rest_sum = _mm256_add_epi32(rest_sum, ri);
    store_bytes8(ci, codes + place(j));
    store_bytes8(ri, residual + place(j));
  }
  out.code_sum = hsum_epi32(codes_sum);
  out.rest_sum = hsum_epi32(rest_sum);
  return out;
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
  for (int64_t b = 0; b < blocks; ++b) {
    // 8 values never straddle a 16-value quarter, so they stay together in the chunk order.
    const BlockCode code = quantize_block<G>(x + b * G, false, out.codes.data(), out.residual.data(),
                                             [&](int j) { return chunk_offset<BITS>(b * G + j); });
    out.sum[b] = code.sum;
    out.d[b] = code.d;
    if (code.exact) out.exact.push_back(b);
    out.shift[b] = 128.f * code.d * (static_cast<float>(code.code_sum) + static_cast<float>(code.rest_sum) / kResidualScale);
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

#if defined(PS_AVX512)
// Several rows (decode batches, prefill) on AVX-512 VNNI: x rounded as the one-row path rounds it (an
// int8 code and an int8 residual per value), its outliers set aside in float, against weights
// transposed per call into groups of 16 output rows, so each int32 lane of a vpdpbusd is one output and
// a broadcast dword of x codes (4 values) meets 16 rows' 4 weights: 64 multiply-adds per instruction,
// twice per value (code and residual), then one float scale per block and row, where the float path
// needs a decode and an FMA per 16 weights and row.
// NOTE: the same scheme on AVX2 (8-row groups, weights widened to int16 pairs, code and residual
// joined into one int16 for madd) ran a SmolLM2 layer's projections 1.05x the float path at 16 rows
// and 1.45x at 64 alone, but batch-16 decode end to end at 204 tok/s against 242: AVX2 keeps float.

// Every row of x, quantized per weight block, in x's own order.
struct I8Rows {
  struct Term {
    int32_t k;   // x's column
    float v;
  };
  std::vector<int8_t> codes;      // [rows, K]; 0 at spikes
  std::vector<int8_t> residual;   // [rows, K]
  std::vector<float> d;           // [rows, blocks]; 0 in all-zero blocks
  std::vector<int32_t> code_sum;  // [rows, blocks]: -128 * sum(codes) (8-bit weights run as code + 128)
  std::vector<int32_t> rest_sum;  // [rows, blocks]: -128 * sum(residual)
  std::vector<float> sum;         // [rows, blocks]: the block's exact sum, for weight offsets
  std::vector<std::vector<Term>> floats;   // per row: its spikes
};

template <int G>
void quantize_rows_i8(const float* x, int64_t rows, int64_t K, I8Rows& out) {
  const int64_t blocks = K / G;
  out.codes.resize(rows * K);
  out.residual.resize(rows * K);
  out.d.resize(rows * blocks);
  out.code_sum.resize(rows * blocks);
  out.rest_sum.resize(rows * blocks);
  out.sum.resize(rows * blocks);
  out.floats.resize(rows);
  auto quantize = [&](int64_t begin, int64_t end) {
    for (int64_t m = begin; m < end; ++m) {
      out.floats[m].clear();
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t at = m * K + b * G, slot = m * blocks + b;
        const BlockCode code = quantize_block<G>(x + at, true, out.codes.data() + at, out.residual.data() + at,
                                                 [](int j) { return j; });
        out.d[slot] = code.d;
        out.sum[slot] = code.sum;
        out.code_sum[slot] = -128 * code.code_sum;
        out.rest_sum[slot] = -128 * code.rest_sum;
        for (int i = 0; i < code.spikes; ++i) {
          out.floats[m].push_back({static_cast<int32_t>(b * G + code.spike_at[i]), code.spike_value[i]});
        }
      }
    }
  };
  // Small batches are not worth a fork. NOTE: at 16 rows this one is not small for down_proj, whose
  // heavy-tailed inputs send most blocks through the outlier search: forking from 4k values made that
  // projection 1.85x faster alone, but batch-16 decode end to end did not show it (255 / 295 tok/s
  // against 311 / 285, alternating), so the threshold stays.
  if (rows * K < (int64_t{1} << 15)) {
    quantize(0, rows);
  } else {
    at::parallel_for(0, rows, 4, quantize);
  }
}

// 16 rows of 16 dwords -> 16 columns: afterwards r[j] lane i holds what r[i] lane j held.
inline void transpose16(__m512i* r) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    u[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    u[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    u[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    u[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int h = 0; h < 16; h += 8) {
    for (int j = 0; j < 4; ++j) {
      t[h + j] = _mm512_shuffle_i32x4(u[h + j], u[h + 4 + j], 0x88);
      t[h + 4 + j] = _mm512_shuffle_i32x4(u[h + j], u[h + 4 + j], 0xdd);
    }
  }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0x88);
    r[8 + j] = _mm512_shuffle_i32x4(t[j], t[8 + j], 0xdd);
  }
}

// `rows` (<= 16) rows of `count` dwords, `stride` bytes apart -> out[j] lane i = dword j of row i (0 past
// `rows`). Each row is read front to back, 64 bytes at a time.
inline void transpose_rows(const void* src, int64_t stride, int rows, int64_t count, __m512i* out) {
  const uint8_t* base = static_cast<const uint8_t*>(src);
  for (int64_t c = 0; c < count; c += 16) {
    const int64_t take = std::min<int64_t>(16, count - c);
    const __mmask16 mask = static_cast<__mmask16>((1u << take) - 1);
    __m512i r[16];
    for (int i = 0; i < 16; ++i) {
      r[i] = i < rows ? _mm512_maskz_loadu_epi32(mask, base + i * stride + 4 * c) : _mm512_setzero_si512();
    }
    transpose16(r);
    for (int64_t j = 0; j < take; ++j) out[c + j] = r[j];
  }
}

// One group of 16 weight rows, transposed: per block, group_bytes / 4 registers whose lane i holds
// dword t of row i's block (8-bit codes XORed to unsigned), and the rows' scales and offsets per block.
template <int G, int BITS>
struct RowGroup {
  static constexpr int kRows = 16;
  using Acc = __m512;
  static constexpr int kDwords = G * BITS / 8 / 4;
  std::vector<__m512i> codes;   // [blocks][kDwords]
  std::vector<__m512i> scales;  // [blocks], float bits
  std::vector<__m512i> offsets; // [blocks] (empty without offsets)

  void load(const uint8_t* q, const float* scale, const float* offset, int64_t K, int64_t n0, int rows) {
    const int64_t blocks = K / G, row_bytes = K * BITS / 8;
    codes.resize(blocks * kDwords);
    scales.resize(blocks);
    offsets.resize(offset ? blocks : 0);
    transpose_rows(q + n0 * row_bytes, row_bytes, rows, blocks * kDwords, codes.data());
    if (BITS == 8) {
      for (auto& v : codes) v = _mm512_xor_si512(v, _mm512_set1_epi8(static_cast<char>(0x80)));
    }
    transpose_rows(scale + n0 * blocks, 4 * blocks, rows, blocks, scales.data());
    if (offset) transpose_rows(offset + n0 * blocks, 4 * blocks, rows, blocks, offsets.data());
  }
  __m512 scale(int64_t b) const { return _mm512_castsi512_ps(scales[b]); }
  __m512 offset(int64_t b) const { return _mm512_castsi512_ps(offsets[b]); }

  // Weight k of block b in each of the 16 rows, as floats.
  __m512 column(int64_t b, int k) const {
    if (BITS == 4) {   // byte j of a block holds weight j (low nibble) and j + 16 (high nibble)
      const int j = k & 15;
      const __m512i v = _mm512_srli_epi32(codes[b * kDwords + j / 4], 8 * (j % 4) + (k >= 16 ? 4 : 0));
      return _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(0x0F)));
    }
    const __m512i v = _mm512_and_si512(_mm512_srli_epi32(codes[b * kDwords + k / 4], 8 * (k % 4)), _mm512_set1_epi32(0xFF));
    return _mm512_cvtepi32_ps(_mm512_sub_epi32(v, _mm512_set1_epi32(128)));
  }

  // acc[r] + bias -> y row m + r, the group's `rows` outputs from n0.
  static void store(const Acc* acc, int count, const float* bias, float* y, int64_t m, int64_t N, int64_t n0,
                    int rows) {
    const __mmask16 valid = static_cast<__mmask16>((1u << rows) - 1);
    const __m512 b = bias ? _mm512_maskz_loadu_ps(valid, bias + n0) : _mm512_setzero_ps();
    for (int r = 0; r < count; ++r) _mm512_mask_storeu_ps(y + (m + r) * N + n0, valid, _mm512_add_ps(acc[r], b));
  }
};

inline __m512i broadcast_dword(const int8_t* p) {
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// R rows of x times one row group: 16 outputs per row, before bias.
template <int G, int BITS, int R>
void row_group_tile(const RowGroup<G, BITS>& w, const I8Rows& xq, int64_t m, int64_t K, __m512* acc) {
  constexpr int kDwords = RowGroup<G, BITS>::kDwords;
  const int64_t blocks = K / G;
  for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
  const __m512 residual_step = _mm512_set1_ps(1.f / kResidualScale);
  for (int64_t b = 0; b < blocks; ++b) {
    // 4-bit: register t's low nibbles are weights 4t..4t+3, its high ones 16+4t..16+4t+3.
    __m512i wv[BITS == 4 ? 2 * kDwords : kDwords];
    for (int t = 0; t < kDwords; ++t) {
      const __m512i v = w.codes[b * kDwords + t];
      if (BITS == 4) {
        wv[t] = _mm512_and_si512(v, _mm512_set1_epi8(0x0F));
        wv[kDwords + t] = _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(0x0F));
      } else {
        wv[t] = v;
      }
    }
    for (int r = 0; r < R; ++r) {
      const int64_t slot = (m + r) * blocks + b;
      if (!w.offsets.empty()) acc[r] = _mm512_fmadd_ps(w.offset(b), _mm512_set1_ps(xq.sum[slot]), acc[r]);
      if (xq.d[slot] == 0.f) continue;   // nothing in the codes (all zero past the spikes)
      const int8_t* xc = xq.codes.data() + (m + r) * K + b * G;
      const int8_t* xr = xq.residual.data() + (m + r) * K + b * G;
      __m512i hi = BITS == 8 ? _mm512_set1_epi32(xq.code_sum[slot]) : _mm512_setzero_si512();
      __m512i lo = BITS == 8 ? _mm512_set1_epi32(xq.rest_sum[slot]) : _mm512_setzero_si512();
      for (int t = 0; t < (BITS == 4 ? 2 * kDwords : kDwords); ++t) {
        const int at = BITS == 4 ? (t < kDwords ? 4 * t : 16 + 4 * (t - kDwords)) : 4 * t;
        hi = _mm512_dpbusd_epi32(hi, wv[t], broadcast_dword(xc + at));
        lo = _mm512_dpbusd_epi32(lo, wv[t], broadcast_dword(xr + at));
      }
      const __m512 dot = _mm512_fmadd_ps(_mm512_cvtepi32_ps(lo), residual_step, _mm512_cvtepi32_ps(hi));
      acc[r] = _mm512_fmadd_ps(dot, _mm512_mul_ps(w.scale(b), _mm512_set1_ps(xq.d[slot])), acc[r]);
    }
  }
  // The spikes, in float: one weight column each. Two chains per row.
  for (int r = 0; r < R; ++r) {
    __m512 extra[2] = {_mm512_setzero_ps(), _mm512_setzero_ps()};
    const std::vector<I8Rows::Term>& terms = xq.floats[m + r];
    for (size_t i = 0; i < terms.size(); ++i) {
      const int64_t b = terms[i].k / G;
      const __m512 wv = _mm512_mul_ps(w.column(b, static_cast<int>(terms[i].k % G)), w.scale(b));
      extra[i & 1] = _mm512_fmadd_ps(wv, _mm512_set1_ps(terms[i].v), extra[i & 1]);
    }
    acc[r] = _mm512_add_ps(acc[r], _mm512_add_ps(extra[0], extra[1]));
  }
}

template <int G, int BITS>
void qlinear_rows_i8(const float* x, int64_t num_rows, int64_t K, const uint8_t* q, const float* scale,
                     const float* offset, const float* bias, float* y, int64_t N) {
  using Group = RowGroup<G, BITS>;
  static thread_local I8Rows rows_of_x;
  I8Rows& xq = rows_of_x;   // the caller's: the workers below would name their own thread_local
  quantize_rows_i8<G>(x, num_rows, K, xq);
  constexpr int R = 4;
  const int64_t groups = (N + Group::kRows - 1) / Group::kRows;
  // NOTE: x in slices of kSliceRows, each multiplied by every row group before the next: a slice's codes
  // (~150 KB at K = 576) stay in L2 across the groups; all 512 rows of a prefill chunk did not, and ran
  // at half the speed. Each slice transposes the weights again (a few % at 128 rows).
  constexpr int64_t kSliceRows = 128;
  for (int64_t m0 = 0; m0 < num_rows; m0 += kSliceRows) {
    const int64_t m1 = std::min(num_rows, m0 + kSliceRows);
    at::parallel_for(0, groups, 1, [&](int64_t g_begin, int64_t g_end) {
      static thread_local Group w;
      for (int64_t g = g_begin; g < g_end; ++g) {
        const int64_t n0 = g * Group::kRows;
        const int rows = static_cast<int>(std::min<int64_t>(Group::kRows, N - n0));
        w.load(q, scale, offset, K, n0, rows);
        typename Group::Acc acc[R];
        int64_t m = m0;
        for (; m + R <= m1; m += R) {
          row_group_tile<G, BITS, R>(w, xq, m, K, acc);
          Group::store(acc, R, bias, y, m, N, n0, rows);
        }
        switch (m1 - m) {
          case 3: row_group_tile<G, BITS, 3>(w, xq, m, K, acc); Group::store(acc, 3, bias, y, m, N, n0, rows); break;
          case 2: row_group_tile<G, BITS, 2>(w, xq, m, K, acc); Group::store(acc, 2, bias, y, m, N, n0, rows); break;
          case 1: row_group_tile<G, BITS, 1>(w, xq, m, K, acc); Group::store(acc, 1, bias, y, m, N, n0, rows); break;
          default: break;
        }
      }
    });
  }
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

// Rows (2+) at or below this stream the weights; above it dequantize-and-GEMM wins, except on AVX-512,
// whose integer path streams every count. Measured on both variants (2-core EPYC; Gemma 3's and
// SmolLM2's MLP and head shapes, 4- and 8-bit): streaming 1.2-2x faster at 24-64 rows, even at 128,
// mixed at 256. At 16 it had sent decode batches of 17+ sequences to the GEMM path, dequantizing every
// weight each step (Gemma 3 at batch 64: 107 tok/s, now 182).
constexpr int64_t kStreamingMaxRows = 128;

template <int G, int BITS>
at::Tensor qlinear_impl(const at::Tensor& x, const uint8_t* q, const float* scale, const float* offset,
                        const float* bias, int64_t N) {
  const int64_t K = x.size(-1), num_rows = x.numel() / K;
  auto out_shape = x.sizes().vec();
  out_shape.back() = N;
  at::Tensor y = at::empty(out_shape, x.options());
  float* out = y.data_ptr<float>();
#ifdef PS_AVX2
  if (num_rows == 1) {
    qlinear_row_i8<G, BITS>(x.data_ptr<float>(), K, q, scale, offset, bias, out, N);
    return y;
  }
#endif
#if defined(PS_AVX512)
  // Measured on SmolLM2's own activations (2-core EPYC, AVX-512), against the float paths: 1.8-2.9x at
  // 16 rows, 1.05-3.3x at 64, 0.95-1.6x dequantize-and-GEMM at 512. The float paths are not built here.
  if (num_rows >= 2) qlinear_rows_i8<G, BITS>(x.data_ptr<float>(), num_rows, K, q, scale, offset, bias, out, N);
#else
  // NOTE: integer dot products on AVX2 for one row only (see qlinear_rows_i8).
  if (num_rows <= kStreamingMaxRows) {
    qlinear_rows<G, BITS>(x.data_ptr<float>(), num_rows, K, q, scale, offset, bias, out, N);
  } else {
    at::Tensor y2d = y.view({num_rows, N});
    qlinear_chunks<G, BITS>(x.reshape({num_rows, K}), q, scale, offset, bias, y2d);
  }
#endif
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
