"""Mixture-of-experts MLP: a router picks each token's experts, and each expert runs only on its tokens.

The experts are plain gated MLPs whose projections are `Linear`s, so each expert's weights load (and
stay packed, from a quantized GGUF or an AWQ/GPTQ checkpoint) exactly like a dense layer's. A step
sorts its (token, expert) pairs by expert and runs every expert that got tokens once, on all of them
together: the work is num_tokens * top_k expert MLPs, never num_tokens * num_experts.
"""
from __future__ import annotations

import torch
from torch import nn

from pagedserve.config.moe import MoEConfig
from pagedserve.layers.activation import gated_activation
from pagedserve.layers.linear import Linear
from pagedserve.layers.weight_loader import set_weight_loader


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), gate and up fused into one projection."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str) -> None:
        super().__init__()
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size,
                                   shard_sizes={"gate": intermediate_size, "up": intermediate_size})
        self.down_proj = Linear(intermediate_size, hidden_size)
        self.act = gated_activation(hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class Router(Linear):
    """The gate: [num_tokens, hidden_size] -> [num_tokens, num_experts] logits, plus DeepSeek-V3's
    per-expert bias that steers which experts are chosen (never their weights)."""

    def __init__(self, hidden_size: int, num_experts: int, has_score_bias: bool) -> None:
        super().__init__(hidden_size, num_experts)
        self.e_score_correction_bias: nn.Parameter | None = None
        if has_score_bias:
            bias = nn.Parameter(torch.zeros(num_experts, dtype=torch.float32), requires_grad=False)
            self.e_score_correction_bias = set_weight_loader(bias, _copy_vector)


def _copy_vector(param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None) -> None:
    if tuple(loaded.shape) != tuple(param.shape):
        raise ValueError(f"tensor of shape {tuple(loaded.shape)} does not fit a parameter of shape "
                         f"{tuple(param.shape)}")
    param.data.copy_(loaded)


def select_experts(logits: torch.Tensor, config: MoEConfig, score_bias: torch.Tensor | None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [num_tokens, num_experts] -> (weights float32, expert ids), each [num_tokens, top_k].

    Follows transformers' routers: softmax or sigmoid scores in float32; with groups, only experts of
    the `topk_group` best groups can be chosen; the bias (V3) shifts the choice, the weights are the
    unbiased scores; then optional renormalisation and the routed scaling factor.
    """
    scores = logits.float().softmax(dim=-1) if config.scoring_func == "softmax" else logits.float().sigmoid()
    choice = scores if score_bias is None else scores + score_bias.float()
    if config.num_groups > 1:
        choice = _mask_to_best_groups(choice, config)
    expert_ids = torch.topk(choice, config.num_experts_per_tok, dim=-1)[1]      # [num_tokens, top_k]
    weights = scores.gather(1, expert_ids)
    if config.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + (1e-20 if config.scoring_func == "sigmoid" else 0.0))
    return weights * config.routed_scaling_factor, expert_ids


def _mask_to_best_groups(choice: torch.Tensor, config: MoEConfig) -> torch.Tensor:
    num_tokens = choice.shape[0]
    grouped = choice.view(num_tokens, config.num_groups, -1)       # [num_tokens, num_groups, experts_per_group]
    if config.group_scoring == "top2_sum":
        group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
    else:
        group_scores = grouped.max(dim=-1).values                  # [num_tokens, num_groups]
    best_groups = torch.topk(group_scores, config.topk_group, dim=-1)[1]
    keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best_groups, True)
    # V2 masks with 0 (its softmax scores are positive); -inf excludes them for V3's biased sigmoid scores too.
    return grouped.masked_fill(~keep[:, :, None], float("-inf")).view(num_tokens, -1)


class FusedMoE(nn.ModuleList):
    """num_experts gated MLPs (`<e>.gate_up_proj` / `<e>.down_proj`), each run on its tokens only."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, hidden_act: str) -> None:
        super().__init__(GatedMLP(hidden_size, intermediate_size, hidden_act) for _ in range(num_experts))
        self.num_experts = num_experts

    def forward(self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """x [num_tokens, hidden_size], weights/expert_ids [num_tokens, top_k] -> [num_tokens, hidden_size]."""
        top_k = expert_ids.shape[1]
        flat_ids = expert_ids.flatten()                               # [num_tokens * top_k]
        order = torch.argsort(flat_ids, stable=True)
        token_of_pair = order // top_k                                # pairs grouped by expert
        weight_of_pair = weights.flatten()[order]
        counts = torch.bincount(flat_ids, minlength=self.num_experts).tolist()
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        start = 0
        for expert_id, count in enumerate(counts):
            if count == 0:
                continue
            tokens = token_of_pair[start:start + count]
            expert_out = self[expert_id](x[tokens])               # [count, hidden_size]
            out.index_add_(0, tokens, expert_out.float() * weight_of_pair[start:start + count, None])
            start += count
        return out.to(x.dtype)


class SparseMoeBlock(nn.Module):
    """Router + routed experts (+ a shared expert, sigmoid-gated for Qwen2-MoE): the MLP of an MoE layer.

    Parameter names follow Qwen2-MoE / DeepSeek checkpoints: `gate`, `experts.<e>.*`, `shared_expert.*`,
    `shared_expert_gate`; families that name them otherwise rename at load (`checkpoint_renames`)."""

    def __init__(self, hidden_size: int, hidden_act: str, config: MoEConfig) -> None:
        super().__init__()
        self.config = config
        self.gate = Router(hidden_size, config.num_experts, config.has_score_bias)
        self.experts = FusedMoE(config.num_experts, hidden_size, config.moe_intermediate_size, hidden_act)
        self.shared_expert: GatedMLP | None = None
        self.shared_expert_gate: Linear | None = None
        if config.shared_expert_intermediate_size:
            self.shared_expert = GatedMLP(hidden_size, config.shared_expert_intermediate_size, hidden_act)
        if config.has_shared_expert_gate:
            self.shared_expert_gate = Linear(hidden_size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [num_tokens, hidden_size] -> the same."""
        weights, expert_ids = select_experts(self.gate(x), self.config, self.gate.e_score_correction_bias)
        out = self.experts(x, weights, expert_ids)
        if self.shared_expert is not None:
            shared = self.shared_expert(x)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(x)) * shared
            out = out + shared
        return out
