"""DeepSeek-V2 / V3 (R1's architecture) against transformers on tiny random checkpoints: multi-head latent
attention with only the latent and the shared rotary key in the paged cache, absorbed decode, yarn
rope, grouped routing (V3: sigmoid + score bias, groups by their best two; V2: group-limited softmax)
and shared experts. A small KV cache forces preemption; a rerun takes its prompts from the prefix cache."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from pagedserve import LLM
from pagedserve.config import ModelConfig
from pagedserve.layers.mla_attention import MLAAttention
from pagedserve.models.deepseek import DeepseekForCausalLM
from tests.conftest import save_tiny_checkpoint
from tests.moe_gguf import round_trip_to_quantized, write_deepseek_gguf
from tests.parity import check_parity, hf_float_model

ENGINE_ARGS = dict(dtype="float32", max_num_batched_tokens=32, num_kv_blocks=48, block_size=4, num_threads=1)
# mscale == mscale_all_dim as in every DeepSeek release (the GGUF keeps only one of them)
YARN = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 64,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 0.8, "mscale_all_dim": 0.8}
SHAPE = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
             qk_rope_head_dim=16, v_head_dim=24, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
             topk_group=2, first_k_dense_replace=1, max_position_embeddings=512, tie_word_embeddings=False)

pytestmark = pytest.mark.usefixtures("restore_torch_threads")


def _config(version: str):
    from transformers import DeepseekV2Config, DeepseekV3Config

    if version.startswith("v3"):   # R1's: q_lora, noaux_tc with its bias, normalised and scaled weights, yarn
        # "v3-mscale": mscale != mscale_all_dim, so yarn's cos/sin factor is not 1 either
        yarn = YARN | {"mscale": 0.707, "mscale_all_dim": 1.0} if version == "v3-mscale" else YARN
        return DeepseekV3Config(**SHAPE, q_lora_rank=64, n_shared_experts=1, routed_scaling_factor=2.5,
                                norm_topk_prob=True, rope_parameters=yarn)
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
            if version.startswith("v3"):   # a bias that really moves the choice of experts
                model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
                torch.manual_seed(0)
                for layer in model.model.layers[1:]:
                    layer.mlp.gate.e_score_correction_bias.normal_(0, 0.3)
                model.save_pretrained(folder)
            folders[version] = folder
        return folders[version]

    return build


@pytest.mark.parametrize("version", ["v3", "v3-mscale", "v2"])
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
    check_parity(llm, hf_float_model(folder), AutoTokenizer.from_pretrained(folder), atol=1e-3, cached_rerun=True)
    assert llm.engine.scheduler.num_preemptions > 0


@pytest.mark.parametrize("version, split_kv_b", [("v3", True), ("v2", False)])
def test_quantized_deepseek2_gguf_matches_transformers(version, split_kv_b, tiny_deepseek, tmp_path, monkeypatch):
    """`deepseek2` GGUFs of both converter generations (kv_b whole, or split into k_b/v_b for absorption),
    quantized, with the routing, yarn and MLA shapes read back from the metadata."""
    from transformers import AutoTokenizer

    monkeypatch.setattr("pagedserve.loader.tokenizer.pagedserve_cache_dir", lambda: tmp_path / "cache")
    folder = tiny_deepseek(version)
    hf_model, tokenizer = hf_float_model(folder), AutoTokenizer.from_pretrained(folder)
    # the split halves are quantized along other axes than kv_b: written float32 (as are 16-wide k_b rows)
    round_trip_to_quantized(hf_model, keep_float=("kv_b_proj",) if split_kv_b else ())
    path = write_deepseek_gguf(tmp_path / f"deepseek-{version}.gguf", hf_model, tokenizer, split_kv_b)
    llm = LLM(str(path), **ENGINE_ARGS)
    reference = ModelConfig.from_hf(hf_model.config)
    ours = llm.engine.model_config
    # the file stores 0.1 * mscale_all_dim in float32: the softmax scale and yarn's mscale come back rounded
    assert ours.mla.softmax_scale == pytest.approx(reference.mla.softmax_scale, rel=1e-6)
    assert (ours.architecture, ours.moe, dataclasses.replace(ours.mla, softmax_scale=0.0)) == (
        reference.architecture, reference.moe, dataclasses.replace(reference.mla, softmax_scale=0.0))
    if reference.rope_scaling is not None:
        assert ours.rope_scaling is not None and ours.rope_scaling["rope_type"] == "yarn"
        for key in ("factor", "original_max_position_embeddings", "mscale", "mscale_all_dim"):
            assert ours.rope_scaling[key] == pytest.approx(reference.rope_scaling[key], rel=1e-6), key
    check_parity(llm, hf_model, tokenizer, atol=2e-3, cached_rerun=True)
    assert llm.engine.scheduler.num_preemptions > 0
