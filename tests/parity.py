"""Parity against Hugging Face transformers: greedy tokens and prompt logprobs on the same weights.

Eight prompts of different lengths run together with a small step budget, so prompts are chunked
and decodes share steps with prefills: the paged, batched path must give transformers' exact tokens.
"""
from __future__ import annotations

from pathlib import Path

import torch

from pagedserve import LLM, SamplingParams
from pagedserve.kernels import kernel_isa

PROMPTS = [
    "The capital of France is",
    "1, 2, 3,",
    "Once upon a time there was a small model that wanted to serve many users at once, and",
    "你好，世界！",
    "def hello(name):",
    "Large language models predict the next token. Large language models predict",
    "A",
    "The capital of Italy is Rome. The capital of France is Paris. The capital of Spain is Madrid. The capital of",
]
MAX_TOKENS = 12


def hf_float_model(folder: Path):
    """transformers' model of `folder` in float32 with eager attention: the reference the parity tests use."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager").eval()


def hf_greedy(model, tokenizer, prompt_ids: list[int], max_tokens: int) -> tuple[list[int], torch.Tensor]:
    """transformers' greedy continuation and its log-softmax over the prompt positions."""
    input_ids = torch.tensor([prompt_ids])
    with torch.no_grad():
        out = model.generate(input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=max_tokens,
                             do_sample=False, pad_token_id=tokenizer.pad_token_id or 0)
        logits = model(input_ids).logits[0].float()
    generated = out[0, len(prompt_ids):].tolist()
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])
    for index, token in enumerate(generated):   # pagedserve stops at EOS; so does the comparison
        if token in eos_ids:
            generated = generated[:index + 1]
            break
    return generated, torch.log_softmax(logits, dim=-1)


def packed_atol(float_rows: float, rounded_rows: float) -> float:
    """The prompt-logprob tolerance for packed (quantized) weights, by what the loaded kernels do with a
    prompt's rows: float activations on AVX2, and on AVX-512 activations rounded to two int8 levels per
    weight block (kernels/csrc/qlinear.cpp), each value within 1/64516 of its block's largest. Call it
    after the LLM is built (the kernels load then)."""
    return rounded_rows if kernel_isa() == "avx512" else float_rows


def check_parity(llm: LLM, hf_model, tokenizer, atol: float, prompts: list[str] = PROMPTS,
                 max_tokens: int = MAX_TOKENS, lora_request=None, cached_rerun: bool = False) -> list:
    """All prompts through `llm` at once (under `lora_request`'s adapter, if given); each token and prompt
    logprob must match `hf_model` on its own. Returns the outputs.

    With `cached_rerun` the batch runs again without prompt logprobs (which bypass the prefix cache), so
    its prompts' blocks come from the cache: the tokens must still be transformers'."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, prompt_logprobs=1, logprobs=0)
    prompt_ids = [tokenizer.encode(p) for p in prompts]
    expected = [hf_greedy(hf_model, tokenizer, ids, max_tokens) for ids in prompt_ids]
    outputs = llm.generate(prompt_ids, params, lora_request=lora_request)
    for ids, output, (expected_tokens, expected_logprobs) in zip(prompt_ids, outputs, expected):
        assert output.outputs[0].token_ids == expected_tokens, f"prompt {tokenizer.decode(ids)!r}"
        assert output.prompt_logprobs[0] is None
        for position, entry in enumerate(output.prompt_logprobs[1:], start=1):
            token = ids[position]
            ours = entry[token].logprob
            theirs = expected_logprobs[position - 1, token].item()
            assert abs(ours - theirs) < atol, f"position {position}: {ours} vs {theirs}"
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
    if cached_rerun:
        hits_before = llm.engine.block_manager.num_prefix_hits
        rerun = llm.generate(prompt_ids, SamplingParams(temperature=0, max_tokens=max_tokens),
                             lora_request=lora_request)
        assert [output.outputs[0].token_ids for output in rerun] == [tokens for tokens, _ in expected]
        assert llm.engine.block_manager.num_prefix_hits > hits_before
        assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
    return outputs
