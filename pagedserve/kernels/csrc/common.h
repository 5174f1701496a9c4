// SIMD helpers shared by the kernel families (float32 activations).
//
// Built at first use for one instruction-set variant (pagedserve/kernels/isa.py: avx512, avx2, or
// native), so the SIMD paths follow the variant's flags: PS_AVX2 where AVX2 and FMA are available
// (the avx512 variant has both), PS_AVX512 where AVX-512 F/BW/DQ/VL and VNNI are, and every kernel
// keeps a portable path for the rest. Parallelism uses torch's own thread pool (at::parallel_for).
#pragma once

#include <ATen/core/Tensor.h>

#include <cmath>
#include <cstdint>
#include <string>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define PS_AVX2 1
#endif
#if defined(PS_AVX2) && defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && \
    defined(__AVX512VL__) && defined(__AVX512VNNI__)
#define PS_AVX512 1
#endif

namespace pagedserve {

// The op torch.ops.pagedserve.compiled_isa: the widest SIMD paths this build compiled ("avx512",
// "avx2" or "portable"), so a test can tell the variant's flags reached the compiler.
inline std::string compiled_isa() {
#if defined(PS_AVX512)
  return "avx512";
#elif defined(PS_AVX2)
  return "avx2";
#else
  return "portable";
#endif
}

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

// Argument checks shared by the ops and the custom classes. Each names the op and the argument, so
// a caller passing the wrong tensor reads "LlamaDecodeLayer: k_cache must be float32, got Half" rather
// than getting garbage or a crash. `op` and `name` are literals: nothing is built unless a check fails.
inline void check_tensor(const at::Tensor& t, const char* op, const char* name, at::ScalarType dtype, int64_t dim) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is missing");
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be on the CPU, got ", t.device());
  TORCH_CHECK(t.dim() == dim, op, ": ", name, " must have ", dim, " dims, got shape ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
}

inline void check_size(const at::Tensor& t, int64_t dim, int64_t expected, const char* op, const char* name) {
  TORCH_CHECK(t.size(dim) == expected, op, ": ", name, " must have size ", expected, " in dim ", dim,
              ", got shape ", t.sizes());
}

}  // namespace pagedserve
