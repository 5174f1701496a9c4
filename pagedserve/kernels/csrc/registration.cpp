// The one registration of pagedserve's CPU kernels: the ops torch.ops.pagedserve.* and the custom
// classes torch.classes.pagedserve.* (float32 activations).
//
// qlinear.{h,cpp}:      qlinear and PackedLinear, packed group-quantized weights times float activations
// attention.{h,cpp}:    paged_attention, one query token per sequence read through the block tables
// elementwise.{h,cpp}:  add_rms_norm, rms_norm, rotary_inplace, silu_and_mul, gelu_and_mul
// fused_layer.{h,cpp}:  LlamaDecodeLayer and Gemma3DecodeLayer, whole decoder layers for decode-only steps
// common.h:             SIMD helpers, the argument checks every entry point runs, compiled_isa
// shm_allreduce.{h,cpp}: ShmCommunicator, tensor-parallel collectives through shared memory (registered by a
//                        TORCH_LIBRARY_FRAGMENT of its own, beside the class)
#include <torch/custom_class.h>
#include <torch/library.h>

#include "attention.h"
#include "common.h"
#include "elementwise.h"
#include "fused_layer.h"
#include "qlinear.h"

using pagedserve::Gemma3DecodeLayer;
using pagedserve::LlamaDecodeLayer;
using pagedserve::PackedLinear;

TORCH_LIBRARY(pagedserve, m) {
  m.def("qlinear(Tensor x, Tensor codes, Tensor scale, Tensor? offset, Tensor? bias, int group_size, int bits) -> Tensor");
  m.def("paged_attention(Tensor(a!) out, Tensor query, Tensor k_cache, Tensor v_cache, Tensor block_tables, "
        "Tensor context_lens, float scale, int? window, float? softcap) -> ()");
  m.def("add_rms_norm(Tensor(a!) x, Tensor(b!) residual, Tensor weight, float eps) -> ()");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("rotary_inplace(Tensor(a!) x, Tensor cos, Tensor sin, int head_dim) -> ()");
  m.def("silu_and_mul(Tensor x) -> Tensor");
  m.def("gelu_and_mul(Tensor x) -> Tensor");
  m.def("compiled_isa() -> str", &pagedserve::compiled_isa);   // no tensors: one kernel for every backend

  // NOTE: every constructor and method argument is named (torch::arg, none with a default), so
  // Python passes them by keyword and a missing or misspelt one is an error naming it.
  m.class_<PackedLinear>("PackedLinear")
      .def(torch::init<at::Tensor, at::Tensor, c10::optional<at::Tensor>, c10::optional<at::Tensor>, int64_t,
                       int64_t>(),
           "A packed [out_features, in_features] weight and its bias, checked once.",
           {torch::arg("codes"), torch::arg("scales"), torch::arg("offsets"), torch::arg("bias"),
            torch::arg("group_size"), torch::arg("bits")})
      .def("forward", &PackedLinear::forward, "x [..., in_features] -> [..., out_features]", {torch::arg("x")});

  m.class_<LlamaDecodeLayer>("LlamaDecodeLayer")
      .def(torch::init<at::Tensor, at::Tensor, c10::intrusive_ptr<PackedLinear>, c10::intrusive_ptr<PackedLinear>,
                       c10::intrusive_ptr<PackedLinear>, c10::intrusive_ptr<PackedLinear>, c10::optional<at::Tensor>,
                       c10::optional<at::Tensor>, int64_t, int64_t, int64_t, c10::optional<int64_t>, double,
                       double>(),
           "A Llama-family decoder layer for decode-only steps, its weights checked once.",
           {torch::arg("input_norm"), torch::arg("post_norm"), torch::arg("qkv_proj"), torch::arg("o_proj"),
            torch::arg("gate_up_proj"), torch::arg("down_proj"), torch::arg("q_norm"), torch::arg("k_norm"),
            torch::arg("num_heads"), torch::arg("num_kv_heads"), torch::arg("head_dim"),
            torch::arg("sliding_window"), torch::arg("eps"), torch::arg("scale")})
      .def("forward", &LlamaDecodeLayer::forward, "One decode step of the layer; returns its MLP output.",
           {torch::arg("hidden"), torch::arg("residual"), torch::arg("first_layer"), torch::arg("cos"),
            torch::arg("sin"), torch::arg("k_cache"), torch::arg("v_cache"), torch::arg("slot_mapping"),
            torch::arg("block_tables"), torch::arg("context_lens")});

  m.class_<Gemma3DecodeLayer>("Gemma3DecodeLayer")
      .def(torch::init<at::Tensor, at::Tensor, at::Tensor, at::Tensor, c10::intrusive_ptr<PackedLinear>,
                       c10::intrusive_ptr<PackedLinear>, c10::intrusive_ptr<PackedLinear>,
                       c10::intrusive_ptr<PackedLinear>, at::Tensor, at::Tensor, int64_t, int64_t, int64_t,
                       c10::optional<int64_t>, double, double>(),
           "A Gemma 3 decoder layer for decode-only steps, its weights checked once.",
           {torch::arg("input_norm"), torch::arg("post_attention_norm"), torch::arg("pre_feedforward_norm"),
            torch::arg("post_feedforward_norm"), torch::arg("qkv_proj"), torch::arg("o_proj"),
            torch::arg("gate_up_proj"), torch::arg("down_proj"), torch::arg("q_norm"), torch::arg("k_norm"),
            torch::arg("num_heads"), torch::arg("num_kv_heads"), torch::arg("head_dim"),
            torch::arg("sliding_window"), torch::arg("eps"), torch::arg("scale")})
      .def("forward", &Gemma3DecodeLayer::forward, "One decode step of the layer; returns its MLP output.",
           {torch::arg("hidden"), torch::arg("residual"), torch::arg("first_layer"), torch::arg("cos"),
            torch::arg("sin"), torch::arg("k_cache"), torch::arg("v_cache"), torch::arg("slot_mapping"),
            torch::arg("block_tables"), torch::arg("context_lens")});
}

TORCH_LIBRARY_IMPL(pagedserve, CPU, m) {
  m.impl("qlinear", &pagedserve::qlinear);
  m.impl("paged_attention", &pagedserve::paged_attention);
  m.impl("add_rms_norm", &pagedserve::add_rms_norm);
  m.impl("rms_norm", &pagedserve::rms_norm);
  m.impl("rotary_inplace", &pagedserve::rotary_inplace);
  m.impl("silu_and_mul", &pagedserve::silu_and_mul);
  m.impl("gelu_and_mul", &pagedserve::gelu_and_mul);
}
