"""llama.cpp's `deepseek2` GGUF (DeepSeek-V2, V3, R1): the transformers config its metadata describes,
and its attention tensors under Hugging Face names.

Two generations of converter exist: older files keep `attn_kv_b` whole; newer ones (for llama.cpp's
absorbed MLA) split it into `attn_k_b` [heads, kv_lora_rank, nope] (transposed) and `attn_v_b` [heads, v,
kv_lora_rank], write head_count_kv 1 and key/value lengths of the latent view, and put the per-head
sizes in key_length_mla / value_length_mla. Both load; a split kv_b is joined back (as float32: the
halves are quantized along different axes, so no packed layout holds both).
"""
from __future__ import annotations

from typing import Any

import numpy as np

LAYER_TENSORS = {  # leaf of blk.N.<leaf> -> module of model.layers.N.<module>
    "attn_q_a": "self_attn.q_a_proj", "attn_q_a_norm": "self_attn.q_a_layernorm", "attn_q_b": "self_attn.q_b_proj",
    "attn_q": "self_attn.q_proj", "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
    "attn_kv_a_norm": "self_attn.kv_a_layernorm", "attn_kv_b": "self_attn.kv_b_proj",
    "attn_output": "self_attn.o_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate", "ffn_gate_shexp": "mlp.shared_experts.gate_proj",
    "ffn_up_shexp": "mlp.shared_experts.up_proj", "ffn_down_shexp": "mlp.shared_experts.down_proj",
}
# llama.cpp names V3's routing bias exp_probs_b.bias; transformers names the tensor itself.
BIAS_TENSORS = {"exp_probs_b": "mlp.gate.e_score_correction_bias"}
SPLIT_KV_B = ("attn_k_b", "attn_v_b")
_GATING_SIGMOID = 2   # llama.cpp's LLAMA_EXPERT_GATING_FUNC_TYPE_SIGMOID


def is_v3(metadata: dict[str, Any], tensor_names: frozenset[str]) -> bool:
    """V3 and R1 gate with a sigmoid and carry the routing bias; V2 gates with a softmax."""
    return (metadata.get("deepseek2.expert_gating_func") == _GATING_SIGMOID
            or any(name.endswith("exp_probs_b.bias") for name in tensor_names))


def deepseek_config(metadata: dict[str, Any], tensor_names: frozenset[str], common: dict[str, Any]) -> dict[str, Any]:
    """transformers DeepseekV2Config / DeepseekV3Config fields beyond `common` (_common_config's)."""
    def get(key: str, default: Any = None) -> Any:
        return metadata.get(f"deepseek2.{key}", default)

    rope_dim = get("rope.dimension_count")
    key_length = get("attention.key_length_mla") or get("attention.key_length")
    value_length = get("attention.value_length_mla") or get("attention.value_length")
    num_groups = get("expert_group_count", 1) or 1
    v3 = is_v3(metadata, tensor_names)
    config = {
        # every head has its own k and v (the file's head_count_kv 1 describes the absorbed latent view)
        "num_key_value_heads": common["num_attention_heads"], "head_dim": rope_dim,
        "q_lora_rank": get("attention.q_lora_rank") or None, "kv_lora_rank": get("attention.kv_lora_rank"),
        "qk_rope_head_dim": rope_dim, "qk_nope_head_dim": key_length - rope_dim, "v_head_dim": value_length,
        "n_routed_experts": get("expert_count"), "num_experts_per_tok": get("expert_used_count"),
        "moe_intermediate_size": get("expert_feed_forward_length"), "n_shared_experts": get("expert_shared_count", 0),
        "first_k_dense_replace": get("leading_dense_block_count", 0),
        "routed_scaling_factor": float(get("expert_weights_scale", 1.0)),
        "norm_topk_prob": bool(get("expert_weights_norm", False)),
        "n_group": num_groups, "topk_group": get("expert_group_used_count", 1) or 1,
    }
    if not v3:
        config["topk_method"] = "group_limited_greedy" if num_groups > 1 else "greedy"
    scaling = common.get("rope_scaling")
    if scaling is not None and scaling.get("rope_type") == "yarn":
        # llama.cpp stores 0.1 * mscale_all_dim as the yarn log multiplier; every DeepSeek release has
        # mscale == mscale_all_dim, which the file does not record: assumed.
        mscale_all_dim = float(get("rope.scaling.yarn_log_multiplier", 0.0)) / 0.1
        scaling = dict(scaling, mscale=mscale_all_dim, mscale_all_dim=mscale_all_dim)
        config["rope_scaling"] = scaling
    return config


def join_kv_b(k_b: np.ndarray, v_b: np.ndarray) -> np.ndarray:
    """attn_k_b [heads, r, nope] and attn_v_b [heads, v, r] -> kv_b_proj's weight [heads * (nope + v), r]."""
    per_head = np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1)       # [heads, nope + v, r]
    return np.ascontiguousarray(per_head.reshape(-1, per_head.shape[-1]))
