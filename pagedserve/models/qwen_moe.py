"""Qwen2-MoE (Qwen1.5-MoE, Qwen2-57B-A14B: qkv bias, a sigmoid-gated shared expert) and Qwen3-MoE
(q/k norms, renormalised top-k, no shared expert): the MoE stack of models/mixtral.py, whose parameter
names are already theirs."""
from __future__ import annotations

from pagedserve.models.mixtral import MoEForCausalLM


class Qwen2MoeForCausalLM(MoEForCausalLM):
    pass


class Qwen3MoeForCausalLM(MoEForCausalLM):
    pass
