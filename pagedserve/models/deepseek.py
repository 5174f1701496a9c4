"""DeepSeek-V2 / V3 (and R1, V3's architecture): multi-head latent attention and routed + shared experts.

Following transformers' modeling_deepseek_v2.py / modeling_deepseek_v3.py:
- queries come from q_a_proj -> q_a_layernorm -> q_b_proj (or one q_proj when q_lora_rank is None),
  split per head into a no-position part and a rotary part;
- kv_a_proj_with_mqa gives each token its latent (normed by kv_a_layernorm) and one rotary key for all
  heads; only those are cached (layers/mla_attention.py), kv_b_proj expands the latent into k and v;
- rotary dimensions come in interleaved pairs (rope_interleave): they are de-interleaved for q and k
  alike before the usual rotate-half rotation, which leaves every q . k unchanged;
- the first `first_k_dense_replace` layers have a dense MLP, the rest routed experts (V2: softmax,
  optionally group-limited; V3: sigmoid with a bias that steers the choice, groups by their best two)
  plus `n_shared_experts` always-on experts.
"""
from __future__ import annotations

import torch
from torch import nn

from pagedserve.config import ModelConfig
from pagedserve.layers.linear import Linear
from pagedserve.layers.mla_attention import MLAAttention
from pagedserve.layers.norm import RMSNorm
from pagedserve.layers.rotary import CosSin, apply_rotary
from pagedserve.models.causal_lm import CausalLM
from pagedserve.models.mixtral import MoEModel

# V3's checkpoints carry multi-token-prediction layers after the last decoder layer (one for V3/R1).
_MAX_MTP_LAYERS = 4
# q_proj is DeepSeek's own (not part of a fused qkv), so only the MLPs' gate/up are fused.
_PACKED_MODULES = {"gate_proj": ("gate_up_proj", "gate"), "up_proj": ("gate_up_proj", "up")}


class DeepseekAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        mla = config.mla
        assert mla is not None, "DeepSeek attention needs the config's MLA shape"
        self.mla = mla
        self.num_heads = config.num_attention_heads
        qk_head_dim = mla.qk_nope_head_dim + mla.qk_rope_head_dim
        hidden, bias = config.hidden_size, config.attention_bias
        if mla.q_lora_rank is None:
            self.q_proj = Linear(hidden, self.num_heads * qk_head_dim)
        else:
            self.q_a_proj = Linear(hidden, mla.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(mla.q_lora_rank, 1e-6)
            self.q_b_proj = Linear(mla.q_lora_rank, self.num_heads * qk_head_dim)
        self.kv_a_proj_with_mqa = Linear(hidden, mla.kv_lora_rank + mla.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(mla.kv_lora_rank, 1e-6)
        self.kv_b_proj = Linear(mla.kv_lora_rank, self.num_heads * (mla.qk_nope_head_dim + mla.v_head_dim))
        self.o_proj = Linear(self.num_heads * mla.v_head_dim, hidden, bias=bias)
        self.attn = MLAAttention(self.num_heads, mla)

    def forward(self, cos_sin: CosSin, hidden_states: torch.Tensor) -> torch.Tensor:
        mla, num_tokens = self.mla, hidden_states.shape[0]
        if mla.q_lora_rank is None:
            q = self.q_proj(hidden_states)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        q = q.view(num_tokens, self.num_heads, -1)                      # [T, H, nope + rope]
        q_nope, q_rope = q.split([mla.qk_nope_head_dim, mla.qk_rope_head_dim], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(hidden_states).split([mla.kv_lora_rank, mla.qk_rope_head_dim],
                                                                      dim=-1)
        latent = self.kv_a_layernorm(latent.contiguous())               # [T, r]
        q_rope = self._rotate(q_rope.reshape(num_tokens, -1), cos_sin).view(num_tokens, self.num_heads, -1)
        k_rope = self._rotate(k_rope.contiguous(), cos_sin)             # [T, rope]
        return self.o_proj(self.attn(q_nope, q_rope, latent, k_rope, self.kv_b_proj))

    def _rotate(self, x: torch.Tensor, cos_sin: CosSin) -> torch.Tensor:
        """x [T, heads * rope] -> rotated, in rotate-half layout (de-interleaved first if the checkpoint
        interleaves its pairs; q and k alike, so q . k is the checkpoint's)."""
        rope = self.mla.qk_rope_head_dim
        if self.mla.rope_interleave:
            x = x.view(x.shape[0], -1, rope // 2, 2).transpose(-1, -2).reshape(x.shape[0], -1)
        return apply_rotary(x.contiguous(), cos_sin, rope)


class DeepseekForCausalLM(CausalLM):
    packed_modules = _PACKED_MODULES
    checkpoint_renames = {".shared_experts.": ".shared_expert."}

    def __init__(self, config: ModelConfig) -> None:
        assert config.mla is not None, "DeepSeek needs the config's MLA shape"
        model = MoEModel(config, attention=lambda config, _: DeepseekAttention(config),
                         rotary_dim=config.mla.qk_rope_head_dim)
        super().__init__(config, model, model.embed_tokens)
        # generation does not run the multi-token-prediction layers
        self.ignored_checkpoint_prefixes = tuple(
            f"model.layers.{config.num_hidden_layers + i}." for i in range(_MAX_MTP_LAYERS))

