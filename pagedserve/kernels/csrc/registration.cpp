// The one registration of pagedserve's CPU kernels, the ops torch.ops.pagedserve.* (float32 activations).
//
// qlinear.{h,cpp}:      qlinear, packed group-quantized weights times float activations
// attention.{h,cpp}:    paged_attention, one query token per sequence read through the block tables
// elementwise.{h,cpp}:  add_rms_norm, rms_norm, rotary_inplace, silu_and_mul, gelu_and_mul
// fused_layer.{h,cpp}:  llama_decode_layer, a whole Llama-family decoder layer for decode-only steps
// common.h:             SIMD helpers and the argument checks every entry point runs
#include <torch/library.h>

#include "attention.h"
#include "elementwise.h"
#include "fused_layer.h"
#include "qlinear.h"

TORCH_LIBRARY(pagedserve, m) {
  m.def("qlinear(Tensor x, Tensor codes, Tensor scale, Tensor? offset, Tensor? bias, int group_size, int bits) -> Tensor");
  m.def("paged_attention(Tensor(a!) out, Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, float scale, int? window, float? softcap) -> ()");
  m.def("add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rotary_inplace(Tensor(a!) x, Tensor cos, Tensor sin, int head_dim) -> ()");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("gelu_and_mul(Tensor x) -> Tensor");
  m.def("llama_decode_layer(Tensor(a!) hidden, Tensor(b!) residual, bool first_layer, Tensor?[] weights, int[] ints, "
        "float[] floats, Tensor cos, Tensor sin, Tensor(c!) k_cache, Tensor(d!) v_cache, Tensor slot_mapping, "
        "Tensor block_tables, Tensor context_lens) -> Tensor");
}

TORCH_LIBRARY_IMPL(pagedserve, CPU, m) {
  m.impl("qlinear", &pagedserve::qlinear);
  m.impl("paged_attention", &pagedserve::paged_attention);
  m.impl("add_rms_norm", &pagedserve::add_rms_norm);
  m.impl("rms_norm", &pagedserve::rms_norm);
  m.impl("rotary_inplace", &pagedserve::rotary_inplace);
  m.impl("silu_and_mul", &pagedserve::silu_and_mul);
  m.impl("gelu_and_mul", &pagedserve::gelu_and_mul);
  m.impl("llama_decode_layer", &pagedserve::llama_decode_layer);
}
