"""Greedy tokens and logits against Hugging Face transformers on the same weights (see tests/parity.py)."""
from __future__ import annotations

import pytest
import torch

from pagedserve import LLM
from tests.parity import PROMPTS, check_parity


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_tiny_random_models_match_transformers(fixture, request):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = request.getfixturevalue(fixture)
    hf_model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    llm = LLM(str(folder), dtype="float32", max_num_batched_tokens=32, num_kv_blocks=256)
    check_parity(llm, hf_model, tokenizer, atol=1e-3)


def test_smollm2_gguf_matches_transformers_gguf_load(smollm2_path, smollm2_hf_model):
    llm = LLM(str(smollm2_path), dtype="float32", max_num_batched_tokens=32, num_kv_blocks=256)
    # Our GGUF tokenizer equals transformers' (tests/test_loader.py), and is much faster to build.
    check_parity(llm, smollm2_hf_model, llm.get_tokenizer(), atol=2e-3)


def test_smollm2_gguf_one_sequence_at_a_time_matches_transformers(smollm2_path, smollm2_hf_model):
    """Decoding one sequence runs the packed matmuls on integer dot products (x as two int8 levels per
    block, tests/test_kernels.py): 32 greedy tokens of each prompt alone must still be transformers'.
    (With one int8 level, as llama.cpp rounds x, 2 of these 8 prompts part from them by token 17.)"""
    llm = LLM(str(smollm2_path), dtype="float32", num_kv_blocks=64)
    for prompt in PROMPTS:
        check_parity(llm, smollm2_hf_model, llm.get_tokenizer(), atol=2e-3, prompts=[prompt], max_tokens=32)
