"""Mixture-of-experts families against transformers on tiny random checkpoints (HF folders and GGUF).

8 experts, top-2, so most experts get a few tokens in a step and some none. A small KV cache
(block size 4) forces preemption, the 32-token step budget chunks the prompts, and a second run of
the batch takes its prompts from the prefix cache.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pagedserve import LLM
from pagedserve.config import ModelConfig
from pagedserve.layers.moe import FusedMoE, SparseMoeBlock
from pagedserve.models.registry import MODEL_REGISTRY
from tests.conftest import save_tiny_checkpoint
from tests.moe_gguf import round_trip_to_quantized, write_moe_gguf
from tests.parity import check_parity

# NOTE: 48 blocks of 4 tokens cannot hold the eight prompts and their generations at once: some are preempted.
ENGINE_ARGS = dict(dtype="float32", max_num_batched_tokens=32, num_kv_blocks=48, block_size=4, num_threads=1)
SHAPE = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
             num_experts_per_tok=2)

pytestmark = pytest.mark.usefixtures("restore_torch_threads")


def _config(family: str):
    from transformers import MixtralConfig, Qwen2MoeConfig, Qwen3MoeConfig

    if family == "mixtral":
        return MixtralConfig(**SHAPE, intermediate_size=64, num_hidden_layers=2, num_local_experts=8,
                             tie_word_embeddings=False)
    if family == "qwen2_moe":   # layer 1 dense, as mlp_only_layers allows; a gated shared expert
        return Qwen2MoeConfig(**SHAPE, intermediate_size=96, moe_intermediate_size=32,
                              shared_expert_intermediate_size=64, num_experts=8, num_hidden_layers=2,
                              mlp_only_layers=[1], tie_word_embeddings=False)
    if family == "qwen3_moe":
        return Qwen3MoeConfig(**SHAPE, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
                              num_hidden_layers=2, head_dim=32, norm_topk_prob=True, tie_word_embeddings=True)
    raise ValueError(family)


@pytest.fixture(scope="module")
def tiny_moe(tmp_path_factory):
    folders: dict[str, Path] = {}

    def build(family: str) -> Path:
        if family not in folders:
            folder = tmp_path_factory.mktemp(f"tiny-{family}")
            folders[family] = save_tiny_checkpoint(folder, _config(family), seed=3, perturb_vectors=True)
        return folders[family]

    return build


def _hf_model(folder: Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


@pytest.mark.parametrize("family, architecture", [
    ("mixtral", "MixtralForCausalLM"),
    ("qwen2_moe", "Qwen2MoeForCausalLM"),
    ("qwen3_moe", "Qwen3MoeForCausalLM"),
])
def test_hf_moe_matches_transformers(family, architecture, tiny_moe):
    from transformers import AutoTokenizer

    folder = tiny_moe(family)
    llm = LLM(str(folder), **ENGINE_ARGS)
    model = llm.engine.runner.model
    assert type(model) is MODEL_REGISTRY[architecture]
    blocks = [m for m in model.modules() if isinstance(m, SparseMoeBlock)]
    assert len(blocks) == (1 if family == "qwen2_moe" else 2)
    assert all(len(block.experts) == 8 for block in blocks)
    check_parity(llm, _hf_model(folder), AutoTokenizer.from_pretrained(folder), atol=1e-3, cached_rerun=True)
    assert llm.engine.scheduler.num_preemptions > 0


def test_experts_run_only_on_their_tokens(monkeypatch):
    """Each expert is called once per step, on exactly the tokens routed to it; unrouted experts never run."""
    from pagedserve.layers.forward_context import AttentionMetadata, ForwardContext, forward_context

    torch.manual_seed(0)
    experts = FusedMoE(num_experts=8, hidden_size=16, intermediate_size=8, hidden_act="silu")
    for param in experts.parameters():
        param.data.normal_()
    calls: dict[int, int] = {}
    for index, expert in enumerate(experts):
        expert.register_forward_hook(lambda module, args, out, index=index: calls.__setitem__(
            index, calls.get(index, 0) + args[0].shape[0]))
    x = torch.randn(5, 16)
    expert_ids = torch.tensor([[0, 3], [3, 0], [5, 0], [0, 5], [3, 5]])
    weights = torch.rand(5, 2)
    meta = AttentionMetadata(torch.zeros(0, dtype=torch.long), 0, torch.zeros(0, 0, dtype=torch.long),
                             torch.zeros(0, dtype=torch.long), [])
    with forward_context(ForwardContext(meta, use_cpu_kernels=False)):
        out = experts(x, weights, expert_ids)
        dense = sum(weights[:, k, None] * torch.stack([experts[int(e)](x[t:t + 1])[0]
                                                      for t, e in enumerate(expert_ids[:, k])]) for k in range(2))
    assert calls == {0: 4 + 4, 3: 3 + 3, 5: 3 + 3}   # the routed calls, then the reference's own row calls
    torch.testing.assert_close(out, dense)


@pytest.mark.parametrize("family, architecture", [("mixtral", "llama"), ("qwen2_moe", "qwen2moe"),
                                                  ("qwen3_moe", "qwen3moe")])
def test_quantized_moe_gguf_matches_transformers(family, architecture, tiny_moe, tmp_path, monkeypatch):
    """Experts stacked and quantized as llama.cpp writes them stay packed, one PackedWeight per expert
    projection, and give the tokens of transformers run on the same dequantized weights."""
    from transformers import AutoTokenizer

    monkeypatch.setattr("pagedserve.loader.tokenizer.pagedserve_cache_dir", lambda: tmp_path / "cache")
    folder = tiny_moe(family)
    hf_model, tokenizer = _hf_model(folder), AutoTokenizer.from_pretrained(folder)
    round_trip_to_quantized(hf_model)
    path = write_moe_gguf(tmp_path / f"{family}.gguf", hf_model, architecture, tokenizer)
    llm = LLM(str(path), **ENGINE_ARGS)
    model = llm.engine.runner.model
    assert llm.engine.model_config.moe == ModelConfig.from_hf(hf_model.config).moe
    experts = [m for m in model.modules() if isinstance(m, FusedMoE)]
    projections = [p for block in experts for expert in block for p in (expert.gate_up_proj, expert.down_proj)]
    if llm.engine.runner.use_cpu_kernels:   # packed, at 4 bits (gate/up, Q4_0) and 8 bits (down, Q8_0)
        assert all(p.packed is not None and p.weight is None for p in projections)
        assert {p.packed.bits for p in projections} == {4, 8}
    check_parity(llm, hf_model, tokenizer, atol=2e-3, cached_rerun=True)
    assert llm.engine.scheduler.num_preemptions > 0
