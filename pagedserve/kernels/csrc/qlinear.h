// qlinear: y = x @ dequant(W)^T (+ bias), W kept as int8 codes with a float scale and offset per group
// of 16 or 32 weights: w = scale * q + offset. Every GGUF block format we load (Q4_0/1, Q5_0/1, Q8_0,
// Q4_K, Q5_K, Q6_K) is exactly this after unpacking (pagedserve/layers/quant.py's PackedWeight).
// x runs as two int8 levels per weight group, against the packed codes in integer dot products, on
// AVX-512 VNNI at every row count and on AVX2 for one row; other rows on AVX2 multiply float x by
// weights decoded on the fly (up to 128 rows) or in cache-sized chunks for torch's GEMM.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>

#include <cstdint>

namespace pagedserve {

// The op torch.ops.pagedserve.qlinear: checks every argument, then multiplies.
at::Tensor qlinear(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& scale,
                   const c10::optional<at::Tensor>& offset, const c10::optional<at::Tensor>& bias,
                   int64_t group_size, int64_t bits);

// A packed [out_features, in_features] weight and its optional bias, checked once when built, as
// torch.classes.pagedserve.PackedLinear(codes=, scales=, offsets=, bias=, group_size=, bits=). The
// fused layers hold these, so a step re-checks only its activations. Holds references, not copies.
struct PackedLinear : torch::CustomClassHolder {
  PackedLinear(at::Tensor codes, at::Tensor scales, c10::optional<at::Tensor> offsets,
               c10::optional<at::Tensor> bias, int64_t group_size, int64_t bits);

  // x [..., in_features] contiguous float32 -> [..., out_features].
  at::Tensor forward(const at::Tensor& x) const;

  at::Tensor codes;                     // int8 [out, in] (bits 8) or uint8 [out, in / 2] (bits 4)
  at::Tensor scales;                    // float32 [out, in / group_size]
  c10::optional<at::Tensor> offsets;    // like scales; none for symmetric formats
  c10::optional<at::Tensor> bias;       // float32 [out]
  int64_t group_size;
  int64_t bits;
  int64_t out_features;
  int64_t in_features;
};

}  // namespace pagedserve
