// Whole decoder layers for a batch of decode tokens (one query per sequence), float32 activations and
// packed weights: everything a Python layer would do in ~20 torch calls, in one.
//
// torch.classes.pagedserve.LlamaDecodeLayer and Gemma3DecodeLayer are built once after loading, with
// named arguments, and check there every weight against the layer's shape; each step then passes only
// that step's tensors to forward(), which checks them cheaply (shapes and dtypes, and the slots it writes).
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/ivalue.h>

#include <cstdint>

#include "qlinear.h"

namespace pagedserve {

// The attention half both layers share: fused q/k/v projection, optional per-head q/k norms, rotary,
// this step's K/V written to the cache, paged attention, o_proj. Not a torch class: a layer holds one.
struct DecodeAttention {
  // `layer` names the owning class in error messages; q_norm, k_norm: [head_dim], both or neither;
  // sliding_window: None for full attention; scale: the attention scale.
  DecodeAttention(const char* layer, c10::intrusive_ptr<PackedLinear> qkv_proj, c10::intrusive_ptr<PackedLinear> o_proj,
                  c10::optional<at::Tensor> q_norm, c10::optional<at::Tensor> k_norm, int64_t num_heads,
                  int64_t num_kv_heads, int64_t head_dim, c10::optional<int64_t> sliding_window, double eps,
                  double scale);

  // Checks one step's tensors, as forward() of either layer takes them (`op` names it).
  void check_step(const char* op, const at::Tensor& hidden, const at::Tensor& residual, const at::Tensor& cos,
                  const at::Tensor& sin, const at::Tensor& k_cache, const at::Tensor& v_cache,
                  const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                  const at::Tensor& context_lens) const;

  // x [batch, hidden] (normed) -> o_proj's output [batch, hidden]; writes K/V at slot_mapping.
  at::Tensor forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& k_cache,
                     at::Tensor& v_cache, const at::Tensor& slot_mapping, const at::Tensor& block_tables,
                     const at::Tensor& context_lens) const;

  c10::intrusive_ptr<PackedLinear> qkv_proj;
  c10::intrusive_ptr<PackedLinear> o_proj;
  c10::optional<at::Tensor> q_norm;
  c10::optional<at::Tensor> k_norm;
  int64_t num_heads;
  int64_t num_kv_heads;
  int64_t head_dim;
  c10::optional<int64_t> sliding_window;
  double eps;
  double scale;
  int64_t hidden_size;   // qkv_proj's in_features
};

// The forward() of both layers: hidden [batch, hidden] this layer's input (the previous layer's MLP
// output, or the embeddings on the first layer), overwritten; residual [batch, hidden] updated in place
// (on the first layer it is filled with `hidden`); cos, sin: [batch, head_dim / 2]; k_cache, v_cache:
// [num_blocks, block_size, num_kv_heads, head_dim], this step's K/V written at slot_mapping [batch];
// block_tables [batch, max_blocks] and context_lens [batch] as paged_attention takes them. Returns the
// layer's MLP output, to be added to the residual by the next layer's input norm.

// Llama, Mistral, Qwen2 (qkv bias) and Qwen3 (q/k norms): pre-norms, SiLU-gated MLP.
struct LlamaDecodeLayer : torch::CustomClassHolder {
  // input_norm, post_norm: [hidden]; scale: head_dim ** -0.5 for Llama.
  LlamaDecodeLayer(at::Tensor input_norm, at::Tensor post_norm, c10::intrusive_ptr<PackedLinear> qkv_proj,
                   c10::intrusive_ptr<PackedLinear> o_proj, c10::intrusive_ptr<PackedLinear> gate_up_proj,
                   c10::intrusive_ptr<PackedLinear> down_proj, c10::optional<at::Tensor> q_norm,
                   c10::optional<at::Tensor> k_norm, int64_t num_heads, int64_t num_kv_heads, int64_t head_dim,
                   c10::optional<int64_t> sliding_window, double eps, double scale);

  at::Tensor forward(at::Tensor hidden, at::Tensor residual, bool first_layer, at::Tensor cos, at::Tensor sin,
                     at::Tensor k_cache, at::Tensor v_cache, at::Tensor slot_mapping, at::Tensor block_tables,
                     at::Tensor context_lens) const;

  DecodeAttention attention;
  at::Tensor input_norm;
  at::Tensor post_norm;
  c10::intrusive_ptr<PackedLinear> gate_up_proj;
  c10::intrusive_ptr<PackedLinear> down_proj;
};

// Gemma 3: norms on both sides of attention and of the MLP (the checkpoint's 1 + w folded into every
// norm weight at load), per-head q/k norms, a GELU-tanh-gated MLP; the caller passes the layer's own
// rotary table (sliding layers rotate with their own base) and scale (query_pre_attn_scalar ** -0.5).
struct Gemma3DecodeLayer : torch::CustomClassHolder {
  // input_norm, post_attention_norm, pre_feedforward_norm, post_feedforward_norm: [hidden].
  Gemma3DecodeLayer(at::Tensor input_norm, at::Tensor post_attention_norm, at::Tensor pre_feedforward_norm,
                    at::Tensor post_feedforward_norm, c10::intrusive_ptr<PackedLinear> qkv_proj,
                    c10::intrusive_ptr<PackedLinear> o_proj, c10::intrusive_ptr<PackedLinear> gate_up_proj,
                    c10::intrusive_ptr<PackedLinear> down_proj, at::Tensor q_norm, at::Tensor k_norm,
                    int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, c10::optional<int64_t> sliding_window,
                    double eps, double scale);

  at::Tensor forward(at::Tensor hidden, at::Tensor residual, bool first_layer, at::Tensor cos, at::Tensor sin,
                     at::Tensor k_cache, at::Tensor v_cache, at::Tensor slot_mapping, at::Tensor block_tables,
                     at::Tensor context_lens) const;

  DecodeAttention attention;
  at::Tensor input_norm;
  at::Tensor post_attention_norm;
  at::Tensor pre_feedforward_norm;
  at::Tensor post_feedforward_norm;
  c10::intrusive_ptr<PackedLinear> gate_up_proj;
  c10::intrusive_ptr<PackedLinear> down_proj;
};

}  // namespace pagedserve
