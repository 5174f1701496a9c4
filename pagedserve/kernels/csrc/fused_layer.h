// One Llama-family decoder layer for a batch of decode tokens (one query per sequence), float32
// activations and packed weights: everything a Python layer would do in ~20 torch calls, in one.
//
// torch.classes.pagedserve.LlamaDecodeLayer is built once after loading, with named arguments, and
// checks there every weight against the layer's shape; each step then passes only that step's
// tensors to forward(), which checks them cheaply (shapes and dtypes, and the slots it writes).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>

#include <cstdint>

#include "qlinear.h"

namespace pagedserve {

struct LlamaDecodeLayer : torch::CustomClassHolder {
  // input_norm, post_norm: [hidden]; q_norm, k_norm: [head_dim] (Qwen3), both or neither;
  // sliding_window: None for full attention; scale: the attention scale (head_dim ** -0.5 for Llama).
  LlamaDecodeLayer(at::Tensor input_norm, at::Tensor post_norm, c10::intrusive_ptr<PackedLinear> qkv_proj,
                   c10::intrusive_ptr<PackedLinear> o_proj, c10::intrusive_ptr<PackedLinear> gate_up_proj,
                   c10::intrusive_ptr<PackedLinear> down_proj, c10::optional<at::Tensor> q_norm,
                   c10::optional<at::Tensor> k_norm, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                   c10::optional<int64_t> sliding_window, double eps, double scale);

  // hidden: [batch, hidden] this layer's input (the previous layer's MLP output, or the embeddings on
  // the first layer), overwritten; residual: [batch, hidden] updated in place (on the first layer it
  // is filled with `hidden`); cos, sin: [batch, head_dim / 2]; k_cache, v_cache: [num_blocks,
  // block_size, num_kv_heads, head_dim], this step's K/V written at slot_mapping [batch];
  // block_tables [batch, max_blocks] and context_lens [batch] as paged_attention takes them.
  // Returns the layer's MLP output, to be added to the residual by the next layer's input norm.
  at::Tensor forward(at::Tensor hidden, at::Tensor residual, bool first_layer, at::Tensor cos, at::Tensor sin,
                     at::Tensor k_cache, at::Tensor v_cache, at::Tensor slot_mapping, at::Tensor block_tables,
                     at::Tensor context_lens) const;

  at::Tensor input_norm;
  at::Tensor post_norm;
  c10::intrusive_ptr<PackedLinear> qkv_proj;
  c10::intrusive_ptr<PackedLinear> o_proj;
  c10::intrusive_ptr<PackedLinear> gate_up_proj;
  c10::intrusive_ptr<PackedLinear> down_proj;
  c10::optional<at::Tensor> q_norm;
  c10::optional<at::Tensor> k_norm;
  int64_t num_heads;
  int64_t num_kv_heads;
  int64_t head_dim;
  c10::optional<int64_t> sliding_window;
  double eps;
  double scale;
  int64_t hidden_size;
};

}  // namespace pagedserve
