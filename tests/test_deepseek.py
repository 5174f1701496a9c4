"""DeepSeek-V2 / V3 (R1's architecture) against transformers on tiny random checkpoints: multi-head latent
attention with only the latent and the shared rotary key in the paged cache, absorbed decode, yarn
rope, grouped routing (V3: sigmoid + score bias, groups by their best two; V2: group-limited softmax)
and shared experts. A small KV cache forces preemption; a rerun takes its prompts from the prefix cache."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pagedserve import LLM
from pagedserve.layers.mla_attention import MLAAttention
from pagedserve.models.deepseek import DeepseekForCausalLM
from tests.conftest import save_tiny_checkpoint
from tests.parity import check_parity

ENGINE_ARGS = dict(dtype="float32", max_num_batched_tokens=32, num_kv_blocks=48, block_size=4, num_threads=1)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 1.0}
SHAPE = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
             qk_rope_head_dim=16, v_head_dim=24, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
             topk_group=2, first_k_dense_replace=1, max_position_embeddings=512, tie_word_embeddings=False)

pytestmark = pytest.mark.usefixtures("restore_torch_threads")


def _config(version: str):
    from transformers import DeepseekV2Config, DeepseekV3Config

    if version == "v3":   # R1's choices: q_lora, noaux_tc with its bias, normalised and scaled weights, yarn
        return DeepseekV3Config(**SHAPE, q_lora_rank=48, n_shared_experts=1, routed_scaling_factor=2.5,
                                norm_topk_prob=True, rope_parameters=YARN)
    # V2-Lite's: one q_proj, group-limited softmax routing, two shared experts, no yarn
    return DeepseekV2Config(**SHAPE, q_lora_rank=None, n_shared_experts=2, topk_method="group_limited_greedy",
                            routed_scaling_factor=1.5)


@pytest.fixture(scope="module")
def tiny_deepseek(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    folders: dict[str, Path] = {}

    def build(version: str) -> Path:
        if version not in folders:
            folder = save_tiny_checkpoint(tmp_path_factory.mktemp(f"tiny-deepseek-{version}"), _config(version),
                                          seed=4, perturb_vectors=True)
            if version == "v3":   # a bias that really moves the choice of experts
                model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
                torch.manual_seed(0)
                for layer in model.model.layers[1:]:
                    layer.mlp.gate.e_score_correction_bias.normal_(0, 0.3)
                model.save_pretrained(folder)
            folders[version] = folder
        return folders[version]

    return build


def _hf_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.mark.parametrize("version", ["v3", "v2"])
def test_deepseek_matches_transformers(version, tiny_deepseek):
    from transformers import AutoTokenizer

    folder = tiny_deepseek(version)
    llm = LLM(str(folder), **ENGINE_ARGS)
    runner = llm.engine.runner
    assert isinstance(runner.model, DeepseekForCausalLM)
    # the cache holds one latent + rotary key per token and layer: 32 + 16 values, not 2 * 4 heads * 40
    caches = [layer.kv_cache for layer in runner.attention_layers]
    assert len(caches) == 3 and all(isinstance(layer, MLAAttention) for layer in runner.attention_layers)
    assert all(cache.shape == (48, 4, 48) for cache in caches)
    assert runner.kv_bytes_per_block(4) == 3 * 48 * 4 * 4
    check_parity(llm, _hf_model(folder), AutoTokenizer.from_pretrained(folder), atol=1e-3, cached_rerun=True)
    assert llm.engine.scheduler.num_preemptions > 0
