"""What a mixture-of-experts checkpoint dictates about routing: `MoEConfig`, built from its transformers config.

One shape for every family: Mixtral (softmax, top-k renormalised), Qwen2-MoE (softmax, a sigmoid-gated
shared expert), Qwen3-MoE (softmax, renormalised), DeepSeek-V2 (softmax, optionally group-limited) and
DeepSeek-V3 (sigmoid, a per-expert bias that only steers the choice, groups ranked by their two best).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

SCORING_FUNCTIONS = ("softmax", "sigmoid")


@dataclass(frozen=True)
class MoEConfig:
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int             # of each routed expert
    # NOTE: one entry per layer: True where the layer's MLP is the routed one, False for a dense MLP.
    sparse_layers: tuple[bool, ...]
    scoring_func: str = "softmax"
    norm_topk_prob: bool = False           # renormalise the chosen experts' weights to sum to 1
    routed_scaling_factor: float = 1.0     # the routed experts' sum is scaled by this
    num_groups: int = 1                    # experts fall into this many groups; tokens pick topk_group of them
    topk_group: int = 1
    # How a group is ranked: by its best expert's score (DeepSeek-V2) or the sum of its best two (V3).
    group_scoring: str = "max"
    has_score_bias: bool = False           # DeepSeek-V3's e_score_correction_bias (noaux_tc)
    shared_expert_intermediate_size: int = 0   # 0: no shared expert
    has_shared_expert_gate: bool = False   # Qwen2-MoE scales its shared expert by sigmoid(x . w)

    def __post_init__(self) -> None:
        if self.scoring_func not in SCORING_FUNCTIONS:
            raise ValueError(f"MoE scoring function {self.scoring_func!r} is not supported "
                             f"(supported: {', '.join(SCORING_FUNCTIONS)})")
        if self.group_scoring not in ("max", "top2_sum"):
            raise ValueError(f"MoE group scoring {self.group_scoring!r} is not supported (max, top2_sum)")
        if not 0 < self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok must be in [1, {self.num_experts}], got {self.num_experts_per_tok}")
        if self.num_experts % self.num_groups or not 0 < self.topk_group <= self.num_groups:
            raise ValueError(f"{self.num_experts} experts cannot form {self.num_groups} groups with topk_group "
                             f"{self.topk_group}")


def moe_config_from_hf(hf_config: Any, num_layers: int) -> MoEConfig | None:
    """The routing of a Mixtral, Qwen2/3-MoE or DeepSeek-V2/V3 config; None for a dense model."""
    model_type = hf_config.model_type
    if model_type == "mixtral":
        return MoEConfig(num_experts=hf_config.num_local_experts, num_experts_per_tok=hf_config.num_experts_per_tok,
                         moe_intermediate_size=hf_config.intermediate_size, sparse_layers=(True,) * num_layers,
                         norm_topk_prob=True)
    if model_type in ("qwen2_moe", "qwen3_moe"):
        step = hf_config.decoder_sparse_step
        dense = set(hf_config.mlp_only_layers or ())
        sparse = tuple(i not in dense and hf_config.num_experts > 0 and (i + 1) % step == 0 for i in range(num_layers))
        shared = getattr(hf_config, "shared_expert_intermediate_size", 0) if model_type == "qwen2_moe" else 0
        return MoEConfig(num_experts=hf_config.num_experts, num_experts_per_tok=hf_config.num_experts_per_tok,
                         moe_intermediate_size=hf_config.moe_intermediate_size, sparse_layers=sparse,
                         norm_topk_prob=bool(hf_config.norm_topk_prob), shared_expert_intermediate_size=shared,
                         has_shared_expert_gate=shared > 0)
    if model_type in ("deepseek_v2", "deepseek_v3"):
        return _deepseek(hf_config, num_layers)
    return None


def _deepseek(hf_config: Any, num_layers: int) -> MoEConfig:
    first_dense = hf_config.first_k_dense_replace
    step = getattr(hf_config, "moe_layer_freq", 1) or 1
    sparse = tuple(i >= first_dense and i % step == 0 for i in range(num_layers))
    is_v3 = hf_config.model_type == "deepseek_v3"
    # V2's "greedy" ignores the groups; its "group_limited_greedy" ranks a group by its best expert, V3's
    # noaux_tc by the sum of its best two (bias included).
    topk_method = getattr(hf_config, "topk_method", "noaux_tc" if is_v3 else "greedy")
    if topk_method not in ("greedy", "group_limited_greedy", "noaux_tc"):
        raise ValueError(f"DeepSeek topk_method {topk_method!r} is not supported "
                         "(greedy, group_limited_greedy, noaux_tc)")
    grouped = topk_method != "greedy"
    num_groups = (hf_config.n_group or 1) if grouped else 1
    return MoEConfig(
        num_experts=hf_config.n_routed_experts, num_experts_per_tok=hf_config.num_experts_per_tok,
        moe_intermediate_size=hf_config.moe_intermediate_size, sparse_layers=sparse,
        scoring_func="sigmoid" if is_v3 else getattr(hf_config, "scoring_func", "softmax"),
        norm_topk_prob=bool(hf_config.norm_topk_prob), routed_scaling_factor=float(hf_config.routed_scaling_factor),
        num_groups=num_groups, topk_group=(hf_config.topk_group or 1) if grouped else 1,
        group_scoring="top2_sum" if is_v3 else "max", has_score_bias=is_v3,
        shared_expert_intermediate_size=hf_config.moe_intermediate_size * (hf_config.n_shared_experts or 0))
