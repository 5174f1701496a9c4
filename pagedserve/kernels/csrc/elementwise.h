// add_rms_norm, rms_norm, rotary_inplace, silu_and_mul, gelu_and_mul: fused elementwise work that
// would otherwise cost several torch ops (and Python dispatches) each. float32, contiguous rows.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace pagedserve {

// residual += x; x = rms_norm(residual) * weight   (both in place; x, residual: [..., hidden])
void add_rms_norm(at::Tensor& x, at::Tensor& residual, const at::Tensor& weight, double eps);

// x [..., hidden] -> rms_norm(x) * weight
at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps);

// Rotate x [num_tokens, num_heads * head_dim] in place ("rotate half" layout) by cos/sin
// [num_tokens, head_dim / 2]. Rows may be strided (x is usually a slice of the fused qkv output).
void rotary_inplace(at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, int64_t head_dim);

// x = [gate | up] along the last dim -> act(gate) * up
at::Tensor silu_and_mul(const at::Tensor& x);
at::Tensor gelu_and_mul(const at::Tensor& x);

}  // namespace pagedserve
