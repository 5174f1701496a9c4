// DecodeAttention, LlamaDecodeLayer and Gemma3DecodeLayer (see fused_layer.h).
#include "fused_layer.h"

#include <ATen/ops/empty.h>

#include <algorithm>

#include "attention.h"
#include "common.h"
#include "elementwise.h"

namespace pagedserve {
namespace {

void check_projection(const char* layer, const c10::intrusive_ptr<PackedLinear>& projection, const char* name,
                      int64_t in_features, int64_t out_features) {
  TORCH_CHECK(projection, layer, ": ", name, " is missing");
  TORCH_CHECK(projection->in_features == in_features && projection->out_features == out_features, layer, ": ",
              name, " must map ", in_features, " inputs to ", out_features, " outputs, got ",
              projection->in_features, " -> ", projection->out_features);
}

void check_norm(const char* layer, const at::Tensor& norm, const char* name, int64_t size) {
  check_tensor(norm, layer, name, at::kFloat, 1);
  check_size(norm, 0, size, layer, name);
}

// gate_up_proj [hidden -> 2 * intermediate] and down_proj [intermediate -> hidden].
void check_mlp(const char* layer, const c10::intrusive_ptr<PackedLinear>& gate_up_proj,
               const c10::intrusive_ptr<PackedLinear>& down_proj, int64_t hidden_size) {
  TORCH_CHECK(gate_up_proj, layer, ": gate_up_proj is missing");
  TORCH_CHECK(gate_up_proj->out_features % 2 == 0, layer, ": gate_up_proj must have [gate | up] outputs (an even ",
              "count), got ", gate_up_proj->out_features);
  const int64_t intermediate_size = gate_up_proj->out_features / 2;
  check_projection(layer, gate_up_proj, "gate_up_proj", hidden_size, 2 * intermediate_size);
  check_projection(layer, down_proj, "down_proj", intermediate_size, hidden_size);
}

const c10::intrusive_ptr<PackedLinear>& present(const char* layer, const c10::intrusive_ptr<PackedLinear>& projection,
                                                const char* name) {
  TORCH_CHECK(projection, layer, ": ", name, " is missing");
  return projection;
}

at::Tensor required(const char* layer, at::Tensor tensor, const char* name) {
  TORCH_CHECK(tensor.defined(), layer, ": ", name, " is missing");
  return tensor;
}

}  // namespace

DecodeAttention::DecodeAttention(const char* layer, c10::intrusive_ptr<PackedLinear> qkv_proj_,
                                 c10::intrusive_ptr<PackedLinear> o_proj_, c10::optional<at::Tensor> q_norm_,
                                 c10::optional<at::Tensor> k_norm_, int64_t num_heads_, int64_t num_kv_heads_,
                                 int64_t head_dim_, c10::optional<int64_t> sliding_window_, double eps_, double scale_)
    : qkv_proj(std::move(qkv_proj_)), o_proj(std::move(o_proj_)),
      q_norm(q_norm_ && q_norm_->defined() ? std::move(q_norm_) : c10::nullopt),
      k_norm(k_norm_ && k_norm_->defined() ? std::move(k_norm_) : c10::nullopt), num_heads(num_heads_),
      num_kv_heads(num_kv_heads_), head_dim(head_dim_), sliding_window(sliding_window_), eps(eps_), scale(scale_),
      hidden_size(present(layer, qkv_proj, "qkv_proj")->in_features) {
  TORCH_CHECK(num_heads > 0 && num_kv_heads > 0 && num_heads % num_kv_heads == 0, layer,
              ": num_heads must be a positive multiple of num_kv_heads, got ", num_heads, " and ", num_kv_heads);
  TORCH_CHECK(head_dim > 0 && head_dim % 2 == 0, layer, ": head_dim must be positive and even (rotary halves), got ",
              head_dim);
  TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), layer, ": q_norm and k_norm come together (got ",
              q_norm ? "q_norm only" : "k_norm only", ")");
  if (q_norm) {
    check_norm(layer, *q_norm, "q_norm", head_dim);
    check_norm(layer, *k_norm, "k_norm", head_dim);
  }
  TORCH_CHECK(!sliding_window || *sliding_window > 0, layer, ": sliding_window must be None or positive, got ",
              *sliding_window);
  TORCH_CHECK(eps > 0, layer, ": eps must be positive, got ", eps);
  TORCH_CHECK(scale > 0, layer, ": scale must be positive, got ", scale);
  const int64_t q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
  check_projection(layer, qkv_proj, "qkv_proj", hidden_size, q_size + 2 * kv_size);
  check_projection(layer, o_proj, "o_proj", q_size, hidden_size);
}

void DecodeAttention::check_step(const char* op, const at::Tensor& hidden, const at::Tensor& residual,
                                 const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& k_cache,
                                 const at::Tensor& v_cache, const at::Tensor& slot_mapping,
                                 const at::Tensor& block_tables, const at::Tensor& context_lens) const {
  // NOTE: checks of this step's tensors only (the weights were checked once, at construction); the
  // values of block_tables and context_lens are checked by paged_attention, which reads through them.
  check_tensor(hidden, op, "hidden", at::kFloat, 2);
  check_size(hidden, 1, hidden_size, op, "hidden");
  const int64_t batch = hidden.size(0);
  TORCH_CHECK(batch > 0, op, ": hidden holds no tokens");
  check_tensor(residual, op, "residual", at::kFloat, 2);
  TORCH_CHECK(residual.sizes() == hidden.sizes(), op, ": residual must have the shape of hidden ", hidden.sizes(),
              ", got ", residual.sizes());
  check_tensor(cos, op, "cos", at::kFloat, 2);
  check_tensor(sin, op, "sin", at::kFloat, 2);
  TORCH_CHECK(cos.size(0) == batch && cos.size(1) == head_dim / 2 && sin.sizes() == cos.sizes(), op,
              ": cos and sin must be [", batch, ", ", head_dim / 2, "], got ", cos.sizes(), " and ", sin.sizes());
  check_tensor(k_cache, op, "k_cache", at::kFloat, 4);
  check_size(k_cache, 2, num_kv_heads, op, "k_cache");
  check_size(k_cache, 3, head_dim, op, "k_cache");
  check_tensor(v_cache, op, "v_cache", at::kFloat, 4);
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), op, ": v_cache must have the shape of k_cache ", k_cache.sizes(),
              ", got ", v_cache.sizes());
  check_tensor(slot_mapping, op, "slot_mapping", at::kLong, 1);
  check_size(slot_mapping, 0, batch, op, "slot_mapping");
  check_tensor(block_tables, op, "block_tables", at::kLong, 2);
  check_size(block_tables, 0, batch, op, "block_tables");
  check_tensor(context_lens, op, "context_lens", at::kLong, 1);
  check_size(context_lens, 0, batch, op, "context_lens");
  const int64_t num_slots = k_cache.size(0) * k_cache.size(1);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK(slots[b] >= 0 && slots[b] < num_slots, op, ": slot_mapping[", b, "] = ", slots[b],
                " is not a slot of the cache (", num_slots, " slots)");
  }
}

at::Tensor DecodeAttention::forward(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin,
                                    at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slot_mapping,
                                    const at::Tensor& block_tables, const at::Tensor& context_lens) const {
  const int64_t batch = x.size(0), q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;
  at::Tensor qkv = qkv_proj->forward(x);                                  // [batch, q + 2 kv]
  at::Tensor q = qkv.narrow(1, 0, q_size), k = qkv.narrow(1, q_size, kv_size);
  if (q_norm) {                                                           // Qwen3, Gemma 3: per-head q/k norms
    q = rms_norm(q.contiguous().view({-1, head_dim}), *q_norm, eps).view({batch, q_size});
    k = rms_norm(k.contiguous().view({-1, head_dim}), *k_norm, eps).view({batch, kv_size});
  }
  rotary_inplace(q, cos, sin, head_dim);
  rotary_inplace(k, cos, sin, head_dim);
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  const float* kp = k.data_ptr<float>();
  const float* vp = qkv.data_ptr<float>() + q_size + kv_size;
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  for (int64_t b = 0; b < batch; ++b) {
    std::copy(kp + b * k.stride(0), kp + b * k.stride(0) + kv_size, kc + slots[b] * kv_size);
    std::copy(vp + b * qkv.stride(0), vp + b * qkv.stride(0) + kv_size, vc + slots[b] * kv_size);
  }
  at::Tensor attn = at::empty({batch, num_heads, head_dim}, x.options());   // [batch, num_heads, head_dim]
  paged_attention(attn, q.contiguous().view({batch, num_heads, head_dim}), k_cache, v_cache, block_tables,
                  context_lens, scale, sliding_window, c10::nullopt);
  return o_proj->forward(attn.view({batch, q_size}));                     // [batch, hidden]
}

namespace {

constexpr const char* kLlama = "LlamaDecodeLayer";
constexpr const char* kLlamaForward = "LlamaDecodeLayer.forward";
constexpr const char* kGemma = "Gemma3DecodeLayer";
constexpr const char* kGemmaForward = "Gemma3DecodeLayer.forward";

// The input norm both layers open with: x = rms_norm(hidden) with residual = hidden on the first layer,
// else residual += hidden and x = rms_norm(residual), in hidden's memory.
at::Tensor input_norm_step(at::Tensor& hidden, at::Tensor& residual, bool first_layer, const at::Tensor& weight,
                           double eps) {
  if (first_layer) {
    residual.copy_(hidden);
    return rms_norm(hidden, weight, eps);
  }
  add_rms_norm(hidden, residual, weight, eps);
  return hidden;
}

}  // namespace

LlamaDecodeLayer::LlamaDecodeLayer(at::Tensor input_norm_, at::Tensor post_norm_,
                                   c10::intrusive_ptr<PackedLinear> qkv_proj_, c10::intrusive_ptr<PackedLinear> o_proj_,
                                   c10::intrusive_ptr<PackedLinear> gate_up_proj_,
                                   c10::intrusive_ptr<PackedLinear> down_proj_, c10::optional<at::Tensor> q_norm_,
                                   c10::optional<at::Tensor> k_norm_, int64_t num_heads_, int64_t num_kv_heads_,
                                   int64_t head_dim_, c10::optional<int64_t> sliding_window_, double eps_,
                                   double scale_)
    : attention(kLlama, std::move(qkv_proj_), std::move(o_proj_), std::move(q_norm_), std::move(k_norm_), num_heads_,
                num_kv_heads_, head_dim_, sliding_window_, eps_, scale_),
      input_norm(std::move(input_norm_)), post_norm(std::move(post_norm_)), gate_up_proj(std::move(gate_up_proj_)),
      down_proj(std::move(down_proj_)) {
  check_norm(kLlama, input_norm, "input_norm", attention.hidden_size);
  check_norm(kLlama, post_norm, "post_norm", attention.hidden_size);
  check_mlp(kLlama, gate_up_proj, down_proj, attention.hidden_size);
}

at::Tensor LlamaDecodeLayer::forward(at::Tensor hidden, at::Tensor residual, bool first_layer, at::Tensor cos,
                                     at::Tensor sin, at::Tensor k_cache, at::Tensor v_cache, at::Tensor slot_mapping,
                                     at::Tensor block_tables, at::Tensor context_lens) const {
  attention.check_step(kLlamaForward, hidden, residual, cos, sin, k_cache, v_cache, slot_mapping, block_tables,
                       context_lens);
  const at::Tensor x = input_norm_step(hidden, residual, first_layer, input_norm, attention.eps);
  at::Tensor out = attention.forward(x, cos, sin, k_cache, v_cache, slot_mapping, block_tables, context_lens);
  add_rms_norm(out, residual, post_norm, attention.eps);
  return down_proj->forward(silu_and_mul(gate_up_proj->forward(out)));
}

Gemma3DecodeLayer::Gemma3DecodeLayer(at::Tensor input_norm_, at::Tensor post_attention_norm_,
                                     at::Tensor pre_feedforward_norm_, at::Tensor post_feedforward_norm_,
                                     c10::intrusive_ptr<PackedLinear> qkv_proj_,
                                     c10::intrusive_ptr<PackedLinear> o_proj_,
                                     c10::intrusive_ptr<PackedLinear> gate_up_proj_,
                                     c10::intrusive_ptr<PackedLinear> down_proj_, at::Tensor q_norm_,
                                     at::Tensor k_norm_, int64_t num_heads_, int64_t num_kv_heads_, int64_t head_dim_,
                                     c10::optional<int64_t> sliding_window_, double eps_, double scale_)
    : attention(kGemma, std::move(qkv_proj_), std::move(o_proj_), required(kGemma, std::move(q_norm_), "q_norm"),
                required(kGemma, std::move(k_norm_), "k_norm"), num_heads_, num_kv_heads_, head_dim_, sliding_window_,
                eps_, scale_),
      input_norm(std::move(input_norm_)), post_attention_norm(std::move(post_attention_norm_)),
      pre_feedforward_norm(std::move(pre_feedforward_norm_)), post_feedforward_norm(std::move(post_feedforward_norm_)),
      gate_up_proj(std::move(gate_up_proj_)), down_proj(std::move(down_proj_)) {
  const int64_t hidden_size = attention.hidden_size;
  check_norm(kGemma, input_norm, "input_norm", hidden_size);
  check_norm(kGemma, post_attention_norm, "post_attention_norm", hidden_size);
  check_norm(kGemma, pre_feedforward_norm, "pre_feedforward_norm", hidden_size);
  check_norm(kGemma, post_feedforward_norm, "post_feedforward_norm", hidden_size);
  check_mlp(kGemma, gate_up_proj, down_proj, hidden_size);
}

at::Tensor Gemma3DecodeLayer::forward(at::Tensor hidden, at::Tensor residual, bool first_layer, at::Tensor cos,
                                      at::Tensor sin, at::Tensor k_cache, at::Tensor v_cache, at::Tensor slot_mapping,
                                      at::Tensor block_tables, at::Tensor context_lens) const {
  attention.check_step(kGemmaForward, hidden, residual, cos, sin, k_cache, v_cache, slot_mapping, block_tables,
                       context_lens);
  const double eps = attention.eps;
  const at::Tensor x = input_norm_step(hidden, residual, first_layer, input_norm, eps);
  at::Tensor out = rms_norm(attention.forward(x, cos, sin, k_cache, v_cache, slot_mapping, block_tables, context_lens),
                            post_attention_norm, eps);
  add_rms_norm(out, residual, pre_feedforward_norm, eps);
  return rms_norm(down_proj->forward(gelu_and_mul(gate_up_proj->forward(out))), post_feedforward_norm, eps);
}

}  // namespace pagedserve
