// One Llama-family decoder layer for a batch of decode tokens (one query per sequence), float32
// activations and packed weights: everything a Python layer would do in ~20 torch calls, in one.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/List.h>

#include <cstdint>

namespace pagedserve {

//   weights: input_norm, post_norm, then (codes, scales, offsets?, bias?) for qkv, o, gate_up and
//            down, then q_norm?, k_norm? (Qwen3); ints: (group, bits) of the four projections, then
//            num_heads, num_kv_heads, head_dim, window (0: none); floats: eps, attention scale.
// `residual` is updated in place (on the first layer it is filled with `hidden`); returns the
// layer's MLP output, to be added to the residual by the next layer's input norm.
at::Tensor llama_decode_layer(at::Tensor& hidden, at::Tensor& residual, bool first_layer,
                              const c10::List<c10::optional<at::Tensor>>& weights, at::IntArrayRef ints,
                              at::ArrayRef<double> floats, const at::Tensor& cos, const at::Tensor& sin,
                              at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slot_mapping,
                              const at::Tensor& block_tables, const at::Tensor& context_lens);

}  // namespace pagedserve
