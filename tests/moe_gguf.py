"""Writing a tiny MoE Hugging Face model as llama.cpp's converter does: experts stacked into one
[num_experts, out, in] tensor per projection (ffn_gate_exps / ffn_up_exps / ffn_down_exps), quantized
with the gguf package's own quantizer."""
from __future__ import annotations

import re
from pathlib import Path

import gguf
import numpy as np
import torch

from tests.tiny_gguf import _add_tokenizer, add_model_metadata, finish, llama_cpp_permute

Q4_0, Q8_0 = gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q8_0
# transformers holds each layer's experts stacked: gate_up_proj [experts, 2 * inter, hidden], down_proj.
_EXPERTS = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")
_LAYER = {  # HF module (after model.layers.N.) -> llama.cpp leaf
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp", "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp", "mlp.shared_expert.down_proj": "ffn_down_shexp",
}
_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def quant_type(gguf_name: str) -> gguf.GGMLQuantizationType:
    """Q8_0 for the down projections (as Q4_K_M keeps them at higher precision), Q4_0 elsewhere."""
    return Q8_0 if "ffn_down" in gguf_name else Q4_0


def round_trip_to_quantized(model, keep_float: tuple[str, ...] = ()) -> None:
    """Replace every matrix of `model` by what its GGUF blocks dequantize to, so the float reference and
    the GGUF hold the same weights (quantizing the result again gives the same blocks: checked).
    Matrices whose names contain one of `keep_float` are written as float32 and left alone."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if (param.dim() < 2 or param.shape[-1] % 32 or name.endswith("mlp.gate.weight")
                    or "shared_expert_gate" in name or any(part in name for part in keep_float)):
                continue
            kind = quant_type("ffn_down" if "down" in name else "")
            blocks = gguf.quants.quantize(param.numpy(), kind)
            values = gguf.quants.dequantize(blocks, kind)
            assert (gguf.quants.quantize(values, kind) == blocks).all()
            param.copy_(torch.from_numpy(values))


def write_moe_gguf(path: Path, model, architecture: str, tokenizer) -> Path:
    """`model` (Mixtral as `llama`, Qwen2-MoE as `qwen2moe`, Qwen3-MoE as `qwen3moe`) as one quantized GGUF.
    Router and shared-expert gate stay float32, as llama.cpp's quantizer leaves them."""
    config = model.config
    writer = gguf.GGUFWriter(path, architecture)
    add_model_metadata(writer, config, "qwen3" if architecture == "qwen3moe" else architecture)
    num_experts = getattr(config, "num_local_experts", None) or config.num_experts
    writer.add_expert_count(num_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    if architecture != "llama":
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if architecture == "qwen2moe":
        writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    _add_tokenizer(writer, tokenizer)
    for name, tensor in model.state_dict().items():
        array = tensor.numpy().astype(np.float32)
        if match := _EXPERTS.fullmatch(name):
            _add_experts(writer, match, array)
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        module, kind = name.rsplit(".", 1)
        if module in _GLOBAL:
            gguf_name = f"{_GLOBAL[module]}.{kind}"
        else:
            layer, leaf = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", module).groups()
            gguf_name = f"blk.{layer}.{_LAYER[leaf]}.{kind}"
        if architecture == "llama" and module.endswith(("q_proj", "k_proj")):
            heads = config.num_attention_heads if module.endswith("q_proj") else config.num_key_value_heads
            array = llama_cpp_permute(array, heads)
        _add(writer, gguf_name, array)
    return finish(writer, path)


def _add_experts(writer: gguf.GGUFWriter, match: re.Match[str], array: np.ndarray) -> None:
    """One layer's stacked experts: down as is, gate_up split in two, as llama.cpp stores them."""
    if match[2] == "down_proj":
        _add(writer, f"blk.{match[1]}.ffn_down_exps.weight", array)
    else:
        gate, up = np.split(array, 2, axis=1)
        _add(writer, f"blk.{match[1]}.ffn_gate_exps.weight", np.ascontiguousarray(gate))
        _add(writer, f"blk.{match[1]}.ffn_up_exps.weight", np.ascontiguousarray(up))


def _add(writer: gguf.GGUFWriter, name: str, array: np.ndarray) -> None:
    if "ffn_gate_inp_shexp" in name:   # as llama.cpp declares it: [hidden]
        array = array.reshape(-1)
    if array.ndim >= 2 and "ffn_gate_inp" not in name and array.shape[-1] % 32 == 0:
        kind = quant_type(name)
        writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)
    else:
        writer.add_tensor(name, array)


_DEEPSEEK_LAYER = {
    "self_attn.q_a_proj": "attn_q_a", "self_attn.q_a_layernorm": "attn_q_a_norm", "self_attn.q_b_proj": "attn_q_b",
    "self_attn.q_proj": "attn_q", "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa",
    "self_attn.kv_a_layernorm": "attn_kv_a_norm", "self_attn.kv_b_proj": "attn_kv_b",
    "self_attn.o_proj": "attn_output", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "mlp.gate": "ffn_gate_inp",
    "mlp.shared_experts.gate_proj": "ffn_gate_shexp", "mlp.shared_experts.up_proj": "ffn_up_shexp",
    "mlp.shared_experts.down_proj": "ffn_down_shexp",
}


def write_deepseek_gguf(path: Path, model, tokenizer, split_kv_b: bool) -> Path:
    """A DeepSeek-V2/V3 model as `deepseek2`, as llama.cpp's converter writes it: with `split_kv_b` as the
    newer converter does (attn_k_b transposed + attn_v_b, head_count_kv 1, *_mla lengths), else kv_b whole."""
    config = model.config
    writer = gguf.GGUFWriter(path, "deepseek2")
    add_model_metadata(writer, config, "deepseek2")
    qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
    if split_kv_b:
        writer.add_head_count_kv(1)
        writer.add_key_length(config.kv_lora_rank + config.qk_rope_head_dim)
        writer.add_value_length(config.kv_lora_rank)
        writer.add_key_length_mla(qk_head_dim)
        writer.add_value_length_mla(config.v_head_dim)
    else:
        writer.add_key_length(qk_head_dim)
        writer.add_value_length(config.v_head_dim)
    if config.q_lora_rank is not None:
        writer.add_q_lora_rank(config.q_lora_rank)
    writer.add_kv_lora_rank(config.kv_lora_rank)
    writer.add_leading_dense_block_count(config.first_k_dense_replace)
    writer.add_expert_count(config.n_routed_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    writer.add_expert_shared_count(config.n_shared_experts)
    writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    writer.add_expert_weights_scale(config.routed_scaling_factor)
    writer.add_expert_group_count(config.n_group)
    writer.add_expert_group_used_count(config.topk_group)
    is_v3 = config.model_type == "deepseek_v3"
    writer.add_expert_weights_norm(bool(config.norm_topk_prob) if is_v3 else False)
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if is_v3 else gguf.ExpertGatingFuncType.SOFTMAX)
    rope = config.rope_parameters
    if rope.get("rope_type") == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        writer.add_rope_scaling_yarn_log_mul(0.1 * rope["mscale_all_dim"])
    _add_tokenizer(writer, tokenizer)
    for name, tensor in model.state_dict().items():
        array = tensor.numpy().astype(np.float32)
        if match := _EXPERTS.fullmatch(name):
            _add_experts(writer, match, array)
            continue
        module, kind = name.rsplit(".", 1)
        if module in _GLOBAL:
            _add(writer, f"{_GLOBAL[module]}.{kind}", array)
            continue
        layer, leaf = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", module).groups()
        if leaf == "mlp.gate" and kind == "e_score_correction_bias":
            writer.add_tensor(f"blk.{layer}.exp_probs_b.bias", array)
        elif leaf == "self_attn.kv_b_proj" and split_kv_b:
            per_head = array.reshape(config.num_attention_heads, -1, config.kv_lora_rank)
            k_b, v_b = np.split(per_head, [config.qk_nope_head_dim], axis=1)
            writer.add_tensor(f"blk.{layer}.attn_k_b.weight", np.ascontiguousarray(k_b.transpose(0, 2, 1)))
            writer.add_tensor(f"blk.{layer}.attn_v_b.weight", np.ascontiguousarray(v_b))
        else:
            _add(writer, f"blk.{layer}.{_DEEPSEEK_LAYER[leaf]}.{kind}", array)
    return finish(writer, path)
