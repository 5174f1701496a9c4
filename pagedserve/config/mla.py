"""Multi-head latent attention (DeepSeek-V2/V3): `MLAConfig`, built from the transformers config."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class MLAConfig:
    q_lora_rank: int | None      # None: queries come from one projection (DeepSeek-V2-Lite)
    kv_lora_rank: int            # width of the compressed latent each token caches
    qk_nope_head_dim: int
    qk_rope_head_dim: int        # the rotary part of q and k; k's is shared by every head and cached
    v_head_dim: int
    softmax_scale: float         # qk_head_dim ** -0.5, times yarn's mscale(factor, mscale_all_dim) ** 2
    rope_interleave: bool = True  # rotary pairs (x0, x1), (x2, x3)... as DeepSeek's checkpoints lay them out

    @property
    def cache_width(self) -> int:
        """Elements one token occupies in a layer's cache: the latent and the rotated shared key."""
        return self.kv_lora_rank + self.qk_rope_head_dim


def mla_config_from_hf(hf_config: Any, rope_scaling: dict[str, Any] | None) -> MLAConfig | None:
    if hf_config.model_type not in ("deepseek_v2", "deepseek_v3"):
        return None
    scale = (hf_config.qk_nope_head_dim + hf_config.qk_rope_head_dim) ** -0.5
    if rope_scaling is not None and (mscale_all_dim := rope_scaling.get("mscale_all_dim")):
        scale *= yarn_mscale(rope_scaling["factor"], mscale_all_dim) ** 2
    return MLAConfig(q_lora_rank=hf_config.q_lora_rank, kv_lora_rank=hf_config.kv_lora_rank,
                     qk_nope_head_dim=hf_config.qk_nope_head_dim, qk_rope_head_dim=hf_config.qk_rope_head_dim,
                     v_head_dim=hf_config.v_head_dim, softmax_scale=scale,
                     rope_interleave=bool(getattr(hf_config, "rope_interleave", True)))


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature for a context `factor` times the original."""
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0
