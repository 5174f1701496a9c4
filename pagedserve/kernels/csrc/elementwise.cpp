// The fused elementwise ops (see elementwise.h).
#include "elementwise.h"

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/Parallel.h>

#include <cmath>

#include "common.h"

namespace pagedserve {
namespace {

inline void rms_norm_row(const float* in, const float* weight, float* out, int64_t hidden, float eps) {
  double sum = 0.0;
  for (int64_t i = 0; i < hidden; ++i) sum += static_cast<double>(in[i]) * in[i];
  const float inv = 1.f / std::sqrt(static_cast<float>(sum / hidden) + eps);
  for (int64_t i = 0; i < hidden; ++i) out[i] = in[i] * inv * weight[i];
}

// x [..., hidden] float32 contiguous and weight [hidden]: what the row loops below assume.
void check_rows(const char* op, const at::Tensor& x, const at::Tensor& weight) {
  TORCH_CHECK(x.defined() && x.scalar_type() == at::kFloat && x.device().is_cpu(), op,
              ": x must be float32 on the CPU");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0 && x.is_contiguous(), op,
              ": x must be contiguous [..., hidden], got shape ", x.sizes());
  check_tensor(weight, op, "weight", at::kFloat, 1);
  check_size(weight, 0, x.size(-1), op, "weight");
}

template <bool kGelu>
at::Tensor gated_act(const at::Tensor& x, const char* op_name) {
  TORCH_CHECK(x.defined() && x.scalar_type() == at::kFloat && x.device().is_cpu(), op_name,
              ": x must be float32 on the CPU");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) > 0 && x.size(-1) % 2 == 0 && x.is_contiguous(), op_name,
              ": x must be contiguous [..., 2 * width] ([gate | up]), got shape ", x.sizes());
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

}  // namespace

void add_rms_norm(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps) {
  check_rows("add_rms_norm", x, weight);
  TORCH_CHECK(residual.defined() && residual.scalar_type() == at::kFloat && residual.is_contiguous() &&
                  residual.sizes() == x.sizes(),
              "add_rms_norm: residual must be contiguous float32 of the shape of x ", x.sizes());
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
  check_rows("rms_norm", x, weight);
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

void rotary_inplace(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t head_dim) {
  constexpr const char* op = "rotary_inplace";
  TORCH_CHECK(head_dim > 0 && head_dim % 2 == 0, op, ": head_dim must be positive and even, got ", head_dim);
  TORCH_CHECK(x.defined() && x.scalar_type() == at::kFloat && x.device().is_cpu() && x.dim() == 2 &&
                  x.stride(1) == 1 && x.size(1) % head_dim == 0,
              op, ": x must be float32 [num_tokens, num_heads * ", head_dim, "] with contiguous rows, got shape ",
              x.sizes(), " strides ", x.strides());
  check_tensor(cos, op, "cos", at::kFloat, 2);
  check_tensor(sin, op, "sin", at::kFloat, 2);
  TORCH_CHECK(cos.size(0) == x.size(0) && cos.size(1) == head_dim / 2 && sin.sizes() == cos.sizes(), op,
              ": cos and sin must be [", x.size(0), ", ", head_dim / 2, "], got ", cos.sizes(), " and ", sin.sizes());
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

at::Tensor silu_and_mul(const at::Tensor& x) { return gated_act<false>(x, "silu_and_mul"); }
at::Tensor gelu_and_mul(const at::Tensor& x) { return gated_act<true>(x, "gelu_and_mul"); }

}  // namespace pagedserve
