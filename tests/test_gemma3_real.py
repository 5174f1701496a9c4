"""Gemma 3 270M (the `gemma3-270m` alias, Q4_K_M GGUF) against transformers' own load of the same file.

Both sides dequantize the same weights to float32, so greedy tokens must be identical (logprobs agree
to ~2e-4: one-row matmuls round activations to two int8 levels per block). The reference load takes a
minute or more, so it is built once for the module.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from pagedserve import LLM
from pagedserve.loader.chat_template import NoChatTemplateError
from pagedserve.config import ModelConfig
from pagedserve.loader.source import resolve_model
from tests.parity import check_parity, packed_atol

pytestmark = pytest.mark.usefixtures("restore_torch_threads")
PROMPTS = ["The capital of France is", "Once upon a time, there was a", "def fibonacci(n):"]
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def gemma3_path():
    return resolve_model("gemma3-270m").path


@pytest.fixture(scope="module")
def gemma3_hf_model(gemma3_path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(gemma3_path.parent, gguf_file=gemma3_path.name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def gemma3_llm():
    # A 16-token budget chunks the prompts and mixes their decodes with other prompts' chunks. One
    # thread (for transformers too, built after this): on a busy 2-core machine two are ~5x slower.
    return LLM("gemma3-270m", dtype="float32", max_num_batched_tokens=16, num_kv_blocks=64, num_threads=1)


def test_config_matches_transformers_gguf_load(gemma3_llm, gemma3_hf_model):
    ours = gemma3_llm.engine.model_config
    # transformers records the dtype it dequantized to; ours records none for a quantized file
    theirs = dataclasses.replace(ModelConfig.from_hf(gemma3_hf_model.config), checkpoint_dtype=None)
    assert ours == theirs
    assert ours.architecture == "Gemma3ForCausalLM" and ours.sliding_windows.count(None) == 3


def test_greedy_tokens_match_transformers_gguf_load(gemma3_llm, gemma3_hf_model):
    # 5e-4: one-row inputs (decoding one sequence) round activations to two int8 levels per block in the
    # packed matmul, ~2e-4 on a logprob here; rounded prompt rows too (packed_atol) take it to 5.6e-4
    # (7e-6 in float). The tokens must still be identical.
    check_parity(gemma3_llm, gemma3_hf_model, gemma3_llm.get_tokenizer(), atol=packed_atol(5e-4, 1e-3),
                 prompts=PROMPTS, max_tokens=MAX_TOKENS)


def test_base_model_has_no_chat_template(gemma3_llm):
    with pytest.raises(NoChatTemplateError, match="no chat template.*--chat-template"):
        gemma3_llm.chat([{"role": "user", "content": "Hello"}])
    assert issubclass(NoChatTemplateError, ValueError)


def test_served_base_model_completes_and_refuses_chat_clearly(gemma3_llm):
    import httpx

    from pagedserve import SamplingParams
    from tests.server_process import ServerProcess

    prompt = "The capital of France is"
    offline = gemma3_llm.generate(prompt, SamplingParams(temperature=0, max_tokens=8))[0].outputs[0].text

    with ServerProcess(["gemma3-270m", "--disable-log-requests", "--num-kv-blocks", "64"]).running() as server:
        completion = httpx.post(server.base_url + "/v1/completions", timeout=120,
                                json={"model": "gemma3-270m", "prompt": prompt, "max_tokens": 8, "temperature": 0})
        assert completion.status_code == 200, completion.text
        assert completion.json()["choices"][0]["text"] == offline and "France" in offline
        chat = httpx.post(server.base_url + "/v1/chat/completions", timeout=120,
                          json={"model": "gemma3-270m", "messages": [{"role": "user", "content": "Hello"}]})
        assert chat.status_code == 400
        assert "no chat template" in chat.json()["error"]["message"]
