// LlamaDecodeLayer (see fused_layer.h).
#include "fused_layer.h"

#include <ATen/ops/empty.h>

#include <algorithm>

#include "attention.h"
#include "common.h"
#include "elementwise.h"

namespace pagedserve {
namespace {

constexpr const char* kInit = "LlamaDecodeLayer";
constexpr const char* kForward = "LlamaDecodeLayer.forward";

void check_projection(const c10::intrusive_ptr<PackedLinear>& projection, const char* name, int64_t in_features,
                      int64_t out_features) {
  TORCH_CHECK(projection, kInit, ": ", name, " is missing");
  TORCH_CHECK(projection->in_features == in_features && projection->out_features == out_features, kInit, ": ",
              name, " must map ", in_features, " inputs to ", out_features, " outputs, got ",
              projection->in_features, " -> ", projection->out_features);
}

}  // namespace

LlamaDecodeLayer::LlamaDecodeLayer(at::Tensor input_norm_, at::Tensor post_norm_,
                                   c10::intrusive_ptr<PackedLinear> qkv_proj_, c10::intrusive_ptr<PackedLinear> o_proj_,
                                   c10::intrusive_ptr<PackedLinear> gate_up_proj_,
                                   c10::intrusive_ptr<PackedLinear> down_proj_, c10::optional<at::Tensor> q_norm_,
                                   c10::optional<at::Tensor> k_norm_, int64_t num_heads_, int64_t num_kv_heads_,
                                   int64_t head_dim_, c10::optional<int64_t> sliding_window_, double eps_,
                                   double scale_)
    : input_norm(std::move(input_norm_)), post_norm(std::move(post_norm_)), qkv_proj(std::move(qkv_proj_)),
      o_proj(std::move(o_proj_)), gate_up_proj(std::move(gate_up_proj_)), down_proj(std::move(down_proj_)),
      q_norm(q_norm_ && q_norm_->defined() ? std::move(q_norm_) : c10::nullopt),
      k_norm(k_norm_ && k_norm_->defined() ? std::move(k_norm_) : c10::nullopt), num_heads(num_heads_),
      num_kv_heads(num_kv_heads_), head_dim(head_dim_), sliding_window(sliding_window_), eps(eps_), scale(scale_) {
  check_tensor(input_norm, kInit, "input_norm", at::kFloat, 1);
  hidden_size = input_norm.size(0);
  check_tensor(post_norm, kInit, "post_norm", at::kFloat, 1);
  check_size(post_norm, 0, hidden_size, kInit, "post_norm");
  TORCH_CHECK(num_heads > 0 && num_kv_heads > 0 && num_heads % num_kv_heads == 0, kInit,
              ": num_heads must be a positive multiple of num_kv_heads, got ", num_heads, " and ", num_kv_heads);
  TORCH_CHECK(head_dim > 0 && head_dim % 2 == 0, kInit, ": head_dim must be positive and even (rotary halves), got ",
              head_dim);
  TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), kInit, ": q_norm and k_norm come together (got ",
              q_norm ? "q_norm only" : "k_norm only", ")");
  if (q_norm) {
    check_tensor(*q_norm, kInit, "q_norm", at::kFloat, 1);
    check_size(*q_norm, 0, head_dim, kInit, "q_norm");
    check_tensor(*k_norm, kInit, "k_norm", at::kFloat, 1);
    check_size(*k_norm, 0, head_dim, kInit, "k_norm");
  }
  TORCH_CHECK(!sliding_window || *sliding_window > 0, kInit, ": sliding_window must be None or positive, got ",
              *sliding_window);
  TORCH_CHECK(eps > 0, kInit, ": eps must be positive, got ", eps);
  TORCH_CHECK(scale > 0, kInit, ": scale must be positive, got ", scale);
  const int64_t q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
  check_projection(qkv_proj, "qkv_proj", hidden_size, q_size + 2 * kv_size);
  check_projection(o_proj, "o_proj", q_size, hidden_size);
  TORCH_CHECK(gate_up_proj, kInit, ": gate_up_proj is missing");
  TORCH_CHECK(gate_up_proj->out_features % 2 == 0, kInit, ": gate_up_proj must have [gate | up] outputs (an even ",
              "count), got ", gate_up_proj->out_features);
  const int64_t intermediate_size = gate_up_proj->out_features / 2;
  check_projection(gate_up_proj, "gate_up_proj", hidden_size, 2 * intermediate_size);
  check_projection(down_proj, "down_proj", intermediate_size, hidden_size);
}

at::Tensor LlamaDecodeLayer::forward(at::Tensor hidden, at::Tensor residual, bool first_layer, at::Tensor cos,
                                     at::Tensor sin, at::Tensor k_cache, at::Tensor v_cache, at::Tensor slot_mapping,
                                     at::Tensor block_tables, at::Tensor context_lens) const {
  // NOTE: checks of this step's tensors only (the weights were checked once, at construction); the
  // values of block_tables and context_lens are checked by paged_attention, which reads through them.
  check_tensor(hidden, kForward, "hidden", at::kFloat, 2);
  check_size(hidden, 1, hidden_size, kForward, "hidden");
  const int64_t batch = hidden.size(0);
  TORCH_CHECK(batch > 0, kForward, ": hidden holds no tokens");
  check_tensor(residual, kForward, "residual", at::kFloat, 2);
  TORCH_CHECK(residual.sizes() == hidden.sizes(), kForward, ": residual must have the shape of hidden ",
              hidden.sizes(), ", got ", residual.sizes());
  check_tensor(cos, kForward, "cos", at::kFloat, 2);
  check_tensor(sin, kForward, "sin", at::kFloat, 2);
  TORCH_CHECK(cos.size(0) == batch && cos.size(1) == head_dim / 2 && sin.sizes() == cos.sizes(), kForward,
              ": cos and sin must be [", batch, ", ", head_dim / 2, "], got ", cos.sizes(), " and ", sin.sizes());
  check_tensor(k_cache, kForward, "k_cache", at::kFloat, 4);
  check_size(k_cache, 2, num_kv_heads, kForward, "k_cache");
  check_size(k_cache, 3, head_dim, kForward, "k_cache");
  check_tensor(v_cache, kForward, "v_cache", at::kFloat, 4);
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), kForward, ": v_cache must have the shape of k_cache ",
              k_cache.sizes(), ", got ", v_cache.sizes());
  check_tensor(slot_mapping, kForward, "slot_mapping", at::kLong, 1);
  check_size(slot_mapping, 0, batch, kForward, "slot_mapping");
  check_tensor(block_tables, kForward, "block_tables", at::kLong, 2);
  check_size(block_tables, 0, batch, kForward, "block_tables");
  check_tensor(context_lens, kForward, "context_lens", at::kLong, 1);
  check_size(context_lens, 0, batch, kForward, "context_lens");
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(slots[b] >= 0 && slots[b] < num_slots, kForward, ": slot_mapping[", b, "] = ", slots[b],
                " is not a slot of the cache (", num_slots, " slots)");
  }

  const int64_t q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
  at::Tensor x = hidden;
  if (first_layer) {
    residual.copy_(hidden);
    x = rms_norm(hidden, input_norm, eps);
  } else {
    add_rms_norm(x, residual, input_norm, eps);
  }
  at::Tensor qkv = qkv_proj->forward(x);                                  // [batch, q + 2 kv]
  at::Tensor q = qkv.narrow(1, 0, q_size), k = qkv.narrow(1, q_size, kv_size);
  if (q_norm) {                                                           // Qwen3: per-head q/k norms
    q = rms_norm(q.contiguous().view({-1, head_dim}), *q_norm, eps).view({batch, q_size});
    k = rms_norm(k.contiguous().view({-1, head_dim}), *k_norm, eps).view({batch, kv_size});
  }
  rotary_inplace(q, cos, sin, head_dim);
  rotary_inplace(k, cos, sin, head_dim);
  const float* kp = k.data_ptr<float>();
  const float* vp = qkv.data_ptr<float>() + q_size + kv_size;
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  for (int64_t b = 0; b < batch; ++b) {
    std::copy(kp + b * k.stride(0), kp + b * k.stride(0) + kv_size, kc + slots[b] * kv_size);
    std::copy(vp + b * qkv.stride(0), vp + b * qkv.stride(0) + kv_size, vc + slots[b] * kv_size);
  }
  at::Tensor attn = at::empty({batch, num_heads, head_dim}, hidden.options());   // [batch, num_heads, head_dim]
  paged_attention(attn, q.contiguous().view({batch, num_heads, head_dim}), k_cache, v_cache, block_tables,
                  context_lens, scale, sliding_window, c10::nullopt);
  at::Tensor out = o_proj->forward(attn.view({batch, q_size}));           // [batch, hidden]
  add_rms_norm(out, residual, post_norm, eps);
  return down_proj->forward(silu_and_mul(gate_up_proj->forward(out)));
}

}  // namespace pagedserve
