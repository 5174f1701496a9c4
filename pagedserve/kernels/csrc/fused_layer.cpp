// llama_decode_layer (see fused_layer.h).
#include "fused_layer.h"

#include <ATen/ops/empty.h>

#include <algorithm>

#include "attention.h"
#include "elementwise.h"
#include "qlinear.h"

namespace pagedserve {

at::Tensor llama_decode_layer(at::Tensor& hidden, at::Tensor& residual, bool first_layer,
                              const c10::List<c10::optional<at::Tensor>>& weights, at::IntArrayRef ints,
                              at::ArrayRef<double> floats, const at::Tensor& cos, const at::Tensor& sin,
                              at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& slot_mapping,
                              const at::Tensor& block_tables, const at::Tensor& context_lens) {
  auto w = [&](int i) -> c10::optional<at::Tensor> { return weights.get(i); };
  auto linear = [&](const at::Tensor& x, int first, int meta) {
    return qlinear(x, *w(first), *w(first + 1), w(first + 2), w(first + 3), ints[meta], ints[meta + 1]);
  };
  const int64_t num_heads = ints[8], num_kv_heads = ints[9], head_dim = ints[10], window = ints[11];
  const double eps = floats[0], scale = floats[1];
  const int64_t batch = hidden.size(0), q_size = num_heads * head_dim, kv_size = num_kv_heads * head_dim;

  at::Tensor x = hidden;
  if (first_layer) {
    residual.copy_(hidden);
    x = rms_norm(hidden, *w(0), eps);
  } else {
    add_rms_norm(x, residual, *w(0), eps);
  }
  at::Tensor qkv = linear(x, 2, 0);                                       // [batch, q + 2 kv]
  at::Tensor q = qkv.narrow(1, 0, q_size), k = qkv.narrow(1, q_size, kv_size);
  if (w(18).has_value()) {                                                // Qwen3: per-head q/k norms
    q = rms_norm(q.contiguous().view({-1, head_dim}), *w(18), eps).view({batch, q_size});
    k = rms_norm(k.contiguous().view({-1, head_dim}), *w(19), eps).view({batch, kv_size});
  }
  rotary_inplace(q, cos, sin, head_dim);
  rotary_inplace(k, cos, sin, head_dim);
  const float* kp = k.data_ptr<float>();
  const float* vp = qkv.data_ptr<float>() + q_size + kv_size;
  const int64_t* slots = slot_mapping.data_ptr<int64_t>();
  float* kc = k_cache.data_ptr<float>();
  float* vc = v_cache.data_ptr<float>();
  for (int64_t b = 0; b < batch; ++b) {
    std::copy(kp + b * k.stride(0), kp + b * k.stride(0) + kv_size, kc + slots[b] * kv_size);
    std::copy(vp + b * qkv.stride(0), vp + b * qkv.stride(0) + kv_size, vc + slots[b] * kv_size);
  }
  at::Tensor attn = at::empty({batch, num_heads, head_dim}, hidden.options());
  paged_attention(attn, q.contiguous().view({batch, num_heads, head_dim}), k_cache, v_cache, block_tables,
                  context_lens, scale, window > 0 ? c10::optional<int64_t>(window) : c10::nullopt, c10::nullopt);
  at::Tensor out = linear(attn.view({batch, q_size}), 6, 2);
  add_rms_norm(out, residual, *w(1), eps);
  return linear(silu_and_mul(linear(out, 10, 4)), 14, 6);
}

}  // namespace pagedserve
