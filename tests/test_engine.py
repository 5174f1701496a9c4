"""The engine with the real SmolLM2 model: preemption, prefix caching, seeds, stops, streaming text."""
from __future__ import annotations

import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.sampling_params import OutputKind

LONG_PREFIX = ("You are a helpful assistant. Answer briefly and precisely. " * 6).strip()


@pytest.fixture(scope="module")
def llm(smollm2_path) -> LLM:
    return LLM(str(smollm2_path), max_num_batched_tokens=64, num_kv_blocks=512)


@pytest.fixture(autouse=True)
def no_leaked_blocks(request):
    """After every engine test, every KV block is free again and no request is left behind."""
    yield
    if "llm" in request.fixturenames:
        engine = request.getfixturevalue("llm").engine
        assert not engine.has_unfinished_requests()
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def greedy(max_tokens: int = 24, **kwargs) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, **kwargs)


def texts(outputs) -> list[str]:
    return [o.outputs[0].text for o in outputs]


def test_generate_and_chat_answer_like_the_model(llm):
    outputs = llm.generate(["The capital of France is", "1, 2, 3,"], greedy(max_tokens=8))
    assert "Paris" in outputs[0].outputs[0].text
    assert outputs[1].outputs[0].text.startswith(" 4, 5")
    chat = llm.chat([{"role": "user", "content": "What is the capital of France?"}], greedy(max_tokens=32))
    assert "Paris" in chat[0].outputs[0].text
    assert chat[0].outputs[0].finish_reason == "stop"


def test_vllm_prompt_dicts_are_prompts(llm):
    """vLLM's TextPrompt / TokensPrompt dicts, alone or in a list, answer as the text and ids do."""
    ids = llm.get_tokenizer().encode("1, 2, 3,")
    plain = llm.generate(["The capital of France is", ids], greedy(max_tokens=8))
    expected = [output.outputs[0].text for output in plain]
    got = llm.generate([{"prompt": "The capital of France is"}, {"prompt_token_ids": ids}], greedy(max_tokens=8))
    assert [output.outputs[0].text for output in got] == expected
    assert llm.generate({"prompt_token_ids": ids}, greedy(max_tokens=8))[0].outputs[0].text == expected[1]
    with pytest.raises(ValueError, match="needs 'prompt' or 'prompt_token_ids'"):
        llm.generate({"text": "x"}, greedy(max_tokens=2))


def test_preemption_completes_everything_identically(smollm2_path, llm):
    prompts = [f"Write number {i} in words: " for i in range(6)]
    expected = texts(llm.generate(prompts, greedy(max_tokens=40)))
    # 12 blocks of 16 tokens cannot hold six ~50-token sequences at once.
    small = LLM(str(smollm2_path), num_kv_blocks=12, max_model_len=160, max_num_batched_tokens=64)
    assert texts(small.generate(prompts, greedy(max_tokens=40))) == expected
    assert small.engine.scheduler.num_preemptions > 0
    assert small.engine.block_manager.num_free_blocks == 12


def test_prefix_cache_reuses_blocks_and_changes_nothing(llm):
    first = llm.generate([LONG_PREFIX + " What is 2 + 2?"], greedy())[0]
    second = llm.generate([LONG_PREFIX + " Name a color."], greedy())[0]
    assert first.num_cached_tokens == 0
    assert second.num_cached_tokens >= 48
    assert second.num_cached_tokens % 16 == 0
    llm.engine.block_manager.reset_prefix_cache()
    uncached = llm.generate([LONG_PREFIX + " Name a color."], greedy())[0]
    assert uncached.num_cached_tokens == 0
    assert uncached.outputs[0].token_ids == second.outputs[0].token_ids


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(llm):
    messages = [{"role": "user", "content": "Tell me a story about a cat."}]
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=24)
    alone = llm.chat(messages, params)[0].outputs[0].text
    others = [SamplingParams(temperature=0.9, seed=i, max_tokens=24) for i in range(15)]
    batch = llm.chat([messages] * 16, others[:7] + [params] + others[7:])
    assert batch[7].outputs[0].text == alone
    distinct = {o.outputs[0].text for o in batch}
    assert len(distinct) > 8                    # different seeds give different samples


def test_n_greater_than_one_shares_the_prompt_and_differs(llm):
    output = llm.generate([LONG_PREFIX + " Say something."], SamplingParams(n=3, temperature=1.0, seed=7,
                                                                             max_tokens=16))[0]
    assert [c.index for c in output.outputs] == [0, 1, 2]
    assert len({c.text for c in output.outputs}) == 3


def test_stop_string_spanning_tokens_is_cut(llm):
    text = llm.generate(["1, 2, 3,"], greedy(max_tokens=30))[0].outputs[0].text
    assert text.startswith(" 4, 5, 6")
    # " 5, 6" is several tokens (" ", "5", ",", " ", "6"...): the stop must be found across them.
    cut = llm.generate(["1, 2, 3,"], greedy(max_tokens=30, stop=["5, 6"]))[0].outputs[0]
    assert cut.text == " 4, "
    assert cut.finish_reason == "stop" and cut.stop_reason == "5, 6"
    kept = llm.generate(["1, 2, 3,"], greedy(max_tokens=30, stop=["5, 6"], include_stop_str_in_output=True))[0]
    assert kept.outputs[0].text == " 4, 5, 6"


def test_stop_token_ids_min_tokens_and_ignore_eos(llm):
    chat_params = dict(temperature=0, max_tokens=60)
    messages = [{"role": "user", "content": "Say hi."}]
    natural = llm.chat(messages, SamplingParams(**chat_params))[0].outputs[0]
    assert natural.finish_reason == "stop"
    longer = llm.chat(messages, SamplingParams(**chat_params, ignore_eos=True))[0].outputs[0]
    assert longer.finish_reason == "length" and len(longer.token_ids) == 60
    at_least = llm.chat(messages, SamplingParams(**chat_params, min_tokens=len(natural.token_ids) + 5))[0].outputs[0]
    assert len(at_least.token_ids) >= len(natural.token_ids) + 5
    first_token = natural.token_ids[0]
    stopped = llm.chat(messages, SamplingParams(**chat_params, stop_token_ids=[first_token]))[0].outputs[0]
    assert stopped.token_ids == [first_token] and stopped.stop_reason == first_token


def test_streamed_chinese_text_is_never_broken_and_adds_up(llm):
    engine = llm.engine
    params = SamplingParams(temperature=0.8, seed=3, max_tokens=40, output_kind=OutputKind.DELTA)
    prompt = llm.get_tokenizer().apply_chat_template(
        [{"role": "user", "content": "请用中文介绍一下北京。"}], tokenize=False, add_generation_prompt=True)
    engine.add_request(llm.processor.process("zh", prompt, params, add_special_tokens=False))
    pieces, token_ids = [], []
    while engine.has_unfinished_requests():
        for output in engine.step():
            pieces.append(output.outputs[0].text)
            token_ids.extend(output.outputs[0].token_ids)
    assert all("\ufffd" not in piece for piece in pieces)
    full = llm.get_tokenizer().decode(token_ids, skip_special_tokens=True)
    assert "".join(pieces) == full
    assert any("\u4e00" <= ch <= "\u9fff" for ch in full)


def test_logprobs_are_consistent(llm):
    output = llm.generate(["The capital of France is"], greedy(max_tokens=4, logprobs=3))[0].outputs[0]
    assert len(output.logprobs) == 4
    for token_id, position in zip(output.token_ids, output.logprobs):
        chosen = position[token_id]
        assert chosen.rank == 1                 # greedy picks the most likely token
        assert len(position) == 3
        assert all(entry.logprob <= chosen.logprob + 1e-6 for entry in position.values())
    assert output.cumulative_logprob == pytest.approx(sum(p[t].logprob for t, p in zip(output.token_ids,
                                                                                        output.logprobs)))


def test_abort_returns_blocks_at_once(llm):
    engine = llm.engine
    engine.add_request(llm.processor.process("a", LONG_PREFIX, greedy(max_tokens=100)))
    engine.step()
    engine.step()
    assert engine.block_manager.num_free_blocks < engine.block_manager.num_blocks
    engine.abort_request("a")
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.has_unfinished_requests()


def test_requests_over_the_context_limit_are_rejected_up_front(smollm2_path):
    small = LLM(str(smollm2_path), max_model_len=64, num_kv_blocks=16)
    with pytest.raises(ValueError, match="maximum context length is 64 tokens"):
        small.generate(["word " * 80], greedy())
    with pytest.raises(ValueError, match=r"requested 74 tokens \(10 in the prompt, 64 in the completion\)"):
        small.generate([list(range(100, 110))], greedy(max_tokens=64))
    unlimited = small.generate(["Count: 1, 2,"], SamplingParams(temperature=0, max_tokens=None, ignore_eos=True))
    completion = unlimited[0].outputs[0]
    assert completion.finish_reason == "length"
    assert len(unlimited[0].prompt_token_ids) + len(completion.token_ids) == 64
    assert not small.engine.has_unfinished_requests()


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(n=0),
                                 dict(max_tokens=0), dict(logprobs=21), dict(min_p=2)])
def test_bad_sampling_params_are_value_errors(bad):
    with pytest.raises(ValueError):
        SamplingParams(**bad)


def test_generation_config_end_ids_stop_generation(tiny_llama_dir, tmp_path):
    """Like Llama 3's <|eot_id|>: an end id listed only in generation_config.json ends the answer."""
    import json
    import shutil

    shutil.copytree(tiny_llama_dir, tmp_path, dirs_exist_ok=True)
    params = SamplingParams(temperature=0, max_tokens=8)
    tokens = LLM(str(tmp_path)).generate("hello world", params)[0].outputs[0].token_ids
    end_id = tokens[3]
    assert end_id not in tokens[:3]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [end_id]}))
    output = LLM(str(tmp_path)).generate("hello world", params)[0].outputs[0]
    assert list(output.token_ids) == list(tokens[:4]) and output.finish_reason == "stop"


def test_a_tiny_temperature_is_greedy(llm):
    prompt = "The capital of France is"
    expected = texts(llm.generate([prompt], greedy(max_tokens=8)))
    assert texts(llm.generate([prompt], SamplingParams(temperature=1e-40, max_tokens=8, seed=5))) == expected


def test_parameters_are_counted_by_their_logical_shape(smollm2_path, llm):
    """Packed 4-bit codes are one parameter each, not half: SmolLM2-135M has 134.5M, as its GGUF lists."""
    import gguf

    expected = sum(int(tensor.n_elements) for tensor in gguf.GGUFReader(smollm2_path).tensors)
    assert llm.engine.runner.num_parameters == expected
    assert round(expected / 1e6, 1) == 134.5


@pytest.fixture(scope="module")
def tiny_q4_gguf(tiny_llama_dir, tmp_path_factory):
    """The tiny Llama with every matrix in Q4_0, so the kernel path keeps packed weights and fuses layers."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tests.tiny_gguf import write_tiny_gguf

    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    return write_tiny_gguf(tmp_path_factory.mktemp("tiny-q4") / "tiny-q4_0.gguf", model, "llama",
                           AutoTokenizer.from_pretrained(tiny_llama_dir), gguf.GGMLQuantizationType.Q4_0)


@pytest.mark.usefixtures("restore_torch_threads")
def test_eager_and_kernel_engines_in_one_process_each_keep_their_own_choice(tiny_q4_gguf, tmp_path, monkeypatch):
    """Whichever engine is built last, an engine with --disable-cpu-kernels runs plain torch and a kernel engine the C++
    kernels: each gives exactly the logprobs it gives when it is the only engine in the process."""
    # The tokenizer built from this throwaway file is cached here, not in the user's cache.
    monkeypatch.setattr("pagedserve.loader.tokenizer.pagedserve_cache_dir", lambda: tmp_path / "cache")
    params = SamplingParams(temperature=0, max_tokens=6, prompt_logprobs=0, logprobs=0)

    def build(plain_torch: bool) -> LLM:
        return LLM(str(tiny_q4_gguf), disable_cpu_kernels=plain_torch, dtype="float32", num_threads=1,
                   num_kv_blocks=64)

    def run(llm: LLM) -> list:
        outputs = llm.generate(["The capital of France is", "1, 2, 3,"], params)
        return [(o.outputs[0].token_ids, o.outputs[0].logprobs, o.prompt_logprobs) for o in outputs]

    eager_alone = run(build(plain_torch=True))
    kernel_alone = run(build(plain_torch=False))
    assert eager_alone != kernel_alone      # the paths round differently, so taking the other one shows
    for eager_first in (True, False):
        first, second = build(plain_torch=eager_first), build(plain_torch=not eager_first)
        eager, kernel = (first, second) if eager_first else (second, first)
        assert not eager.engine.runner.use_cpu_kernels and kernel.engine.runner.use_cpu_kernels
        assert all(layer.fused_decode is None for layer in eager.engine.runner.model.model.layers)
        assert all(layer.fused_decode is not None for layer in kernel.engine.runner.model.model.layers)
        assert run(eager) == eager_alone and run(kernel) == kernel_alone
        # Packed or dequantized, the same weights count the same.
        assert eager.engine.runner.num_parameters == kernel.engine.runner.num_parameters


def test_forward_contexts_are_per_thread():
    """Two engines stepping on their own threads (a server with two models) each see their own context."""
    import threading

    import torch

    from pagedserve.layers.forward_context import (AttentionMetadata, ForwardContext, forward_context,
                                                   get_forward_context)

    empty = torch.zeros(0, dtype=torch.long)
    both_inside = threading.Barrier(2, timeout=10)
    seen: dict[bool, bool] = {}

    def step(use_cpu_kernels: bool) -> None:
        metadata = AttentionMetadata(slot_mapping=empty, num_decodes=0, decode_block_tables=empty.view(0, 0),
                                     decode_context_lens=empty, prefills=[])
        with forward_context(ForwardContext(metadata, use_cpu_kernels)):
            both_inside.wait()
            seen[use_cpu_kernels] = get_forward_context().use_cpu_kernels
            both_inside.wait()

    threads = [threading.Thread(target=step, args=(choice,)) for choice in (True, False)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert seen == {True: True, False: False}
