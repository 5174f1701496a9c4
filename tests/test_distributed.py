"""Tensor, pipeline and tensor x pipeline parallel engines give the single-process engine's greedy tokens and
logprobs: worker ranks started as processes (`mp`), each step's plan broadcast to them, rank 0 sampling.

Each run mixes what a real batch has: prompts chunked by a small token budget, a shared prefix served from
the prefix cache, n > 1, prompt logprobs, and a KV cache small enough to preempt. World sizes stay at 2-4 and
models tiny (2 cores).
"""
from __future__ import annotations

import pytest

from conftest import save_tiny_checkpoint
from parity import PROMPTS
from pagedserve import LLM, SamplingParams

# Sums over a rank's slice of the heads, all-reduced, round differently from one sum over all of them.
LOGPROB_ATOL = 1e-4
# SmolLM2's residual stream carries outlier channels in the hundreds: those rounding differences grow over
# its 30 layers to a few 1e-4 by the later tokens; the tolerance its packed path has against transformers
# (tests/test_parity.py).
SMOLLM2_LOGPROB_ATOL = 2e-3

SHARED = "The capital of Italy is Rome. The capital of France is Paris. The capital of Spain is Madrid. "
RUN_PROMPTS = PROMPTS[:6] + [SHARED + "The capital of", SHARED + "One, two,"]


def engine(path, **parallel) -> LLM:
    # nobind: the test process is rank 0 and must keep its cores for the tests after this one
    return LLM(str(path), dtype="float32", num_threads=1, cpu_threads_bind="nobind", max_num_batched_tokens=24,
               num_kv_blocks=14, block_size=8, distributed_timeout_seconds=120, **parallel)


def run(llm: LLM, max_tokens: int = 10) -> list:
    greedy = SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=1)
    # NOTE: prompt logprobs on the first prompt only: it is admitted first, so never the one preempted (a
    # preempted prompt's logprobs would be computed twice, in the single-process engine too).
    outputs = llm.generate(RUN_PROMPTS, [greedy.replace(prompt_logprobs=1)] + [greedy] * 6
                           + [greedy.replace(n=2, seed=3)])
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks
    results = []
    for output in outputs:
        prompt = [entry[token].logprob for entry, token in zip(output.prompt_logprobs[1:], output.prompt_token_ids[1:])
                  ] if output.prompt_logprobs else []
        for completion in output.outputs:
            chosen = [entry[token].logprob for entry, token in zip(completion.logprobs, completion.token_ids)]
            results.append((completion.token_ids, chosen, prompt))
    return results


def assert_same(expected: list, actual: list) -> None:
    assert [tokens for tokens, _, _ in actual] == [tokens for tokens, _, _ in expected]
    for (_, chosen, prompt), (_, their_chosen, their_prompt) in zip(actual, expected):
        assert chosen == pytest.approx(their_chosen, abs=LOGPROB_ATOL)
        assert prompt == pytest.approx(their_prompt, abs=LOGPROB_ATOL)


def parallel_run(path, max_tokens: int = 10, **parallel) -> list:
    llm = engine(path, **parallel)
    try:
        if parallel.get("tensor_parallel_size", 1) > 1:
            # every rank is on this machine: the all-reduce goes through shared memory unless turned off
            uses_shm = llm.engine.executor.parallel.tp.shm is not None
            assert uses_shm != parallel.get("disable_custom_all_reduce", False)
        results = run(llm, max_tokens)
        if parallel.get("pipeline_parallel_size", 1) > 1:
            # more than one batch in flight: the first stage started a batch while a later one ran the last
            assert llm.engine.num_overlapped_steps > 0
        return results
    finally:
        llm.shutdown()


@pytest.fixture(scope="module")
def tiny_llama_reference(tiny_llama_dir, restore_torch_threads):
    llm = engine(tiny_llama_dir)
    results = run(llm)
    assert llm.engine.scheduler.num_preemptions > 0, "the KV cache was meant to be small enough to preempt"
    return results


@pytest.mark.parametrize("tp, pp", [(2, 1), (1, 2), (2, 2)], ids=["tp2", "pp2", "tp2xpp2"])
def test_tiny_llama_parallel_matches_one_process(tiny_llama_dir, tiny_llama_reference, tp, pp):
    assert_same(tiny_llama_reference, parallel_run(tiny_llama_dir, tensor_parallel_size=tp, pipeline_parallel_size=pp))


def test_tiny_llama_tp2_over_gloo_matches_one_process(tiny_llama_dir, tiny_llama_reference):
    """--disable-custom-all-reduce: the all-reduce goes over gloo's loopback TCP, as across hosts."""
    assert_same(tiny_llama_reference, parallel_run(tiny_llama_dir, tensor_parallel_size=2,
                                                   disable_custom_all_reduce=True))


def test_qwen2_bias_gqa_tied_with_replicated_kv_heads(tiny_qwen2_dir, restore_torch_threads):
    """Qwen2 (qkv bias, tied embedding) at TP=4 over 2 key/value heads: each pair of ranks shares a head."""
    reference = run(engine(tiny_qwen2_dir), max_tokens=6)
    assert_same(reference, parallel_run(tiny_qwen2_dir, max_tokens=6, tensor_parallel_size=4))


def test_qwen3_qk_norm_tp2_pp2(tmp_path, restore_torch_threads):
    from transformers import Qwen3Config

    config = Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=16, max_position_embeddings=512, tie_word_embeddings=False)
    path = save_tiny_checkpoint(tmp_path / "qwen3", config, seed=2, perturb_vectors=True)
    reference = run(engine(path), max_tokens=6)
    assert_same(reference, parallel_run(path, max_tokens=6, tensor_parallel_size=2, pipeline_parallel_size=2))


def test_smollm2_gguf_packed_shards_match_one_process(smollm2_path, restore_torch_threads):
    """The real Q4_1 GGUF, packed blocks cut per rank: TP=3 (its 9 heads and 3 key/value heads split 3 ways)."""
    def smollm(**parallel) -> LLM:
        return LLM(str(smollm2_path), num_threads=1, cpu_threads_bind="nobind", max_num_batched_tokens=32,
                   num_kv_blocks=64, **parallel)

    greedy = SamplingParams(temperature=0, max_tokens=8, logprobs=0)
    prompts = PROMPTS[:3]

    def tokens_and_logprobs(llm: LLM) -> list:
        assert llm.engine.platform.use_cpu_kernels, "packed weights need the CPU kernels"
        return [(o.outputs[0].token_ids, [next(iter(e.values())).logprob for e in o.outputs[0].logprobs])
                for o in llm.generate(prompts, greedy)]

    reference = smollm()
    # NOTE: a shard runs the Python decoder layer (the fused C++ one has no all-reduce inside), so the reference
    # does too; both multiply the packed blocks with the same C++ kernel.
    for layer in reference.engine.runner.model.model.layers:
        layer.fused_decode = None
    expected = tokens_and_logprobs(reference)
    llm = smollm(tensor_parallel_size=3)
    try:
        actual = tokens_and_logprobs(llm)
    finally:
        llm.shutdown()
    assert [tokens for tokens, _ in actual] == [tokens for tokens, _ in expected]
    for (_, ours), (_, theirs) in zip(actual, expected):
        assert ours == pytest.approx(theirs, abs=SMOLLM2_LOGPROB_ATOL)


def test_ranks_that_do_not_divide_the_model_are_a_clear_error(smollm2_path, tiny_llama_dir):
    with pytest.raises(ValueError, match="tensor_parallel_size 2 does not divide the model's 9 attention heads"):
        LLM(str(smollm2_path), tensor_parallel_size=2)
    with pytest.raises(ValueError, match="pipeline_parallel_size 3 is more than the model's 2 layers"):
        LLM(str(tiny_llama_dir), pipeline_parallel_size=3)
    with pytest.raises(ValueError, match="uni runs one rank"):
        LLM(str(tiny_llama_dir), tensor_parallel_size=2, distributed_executor_backend="uni")


def test_gemma3_sliding_window_tp2(tmp_path, restore_torch_threads):
    """Gemma 3 (sliding and global layers, q/k norms, tied head) at TP=2; it has no pipeline stages yet."""
    from transformers import Gemma3TextConfig

    config = Gemma3TextConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                              max_position_embeddings=512, num_hidden_layers=3, head_dim=32,
                              query_pre_attn_scalar=32, sliding_window=8,
                              layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    path = save_tiny_checkpoint(tmp_path / "gemma3", config, seed=2, perturb_vectors=True)
    reference = run(engine(path), max_tokens=6)
    assert_same(reference, parallel_run(path, max_tokens=6, tensor_parallel_size=2))
    with pytest.raises(ValueError, match="cannot be split into pipeline stages yet"):
        LLM(str(path), pipeline_parallel_size=2)
