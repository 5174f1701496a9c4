"""LoRA adapters (PEFT folders) served beside the base model: each adapter's greedy tokens and prompt
logprobs equal peft's merged model, the base and two adapters share one batch, and the prefix cache never
hands one adapter's K/V to another."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pagedserve import LLM, LoRARequest, SamplingParams
from pagedserve.config import EngineConfig
from pagedserve.engine.lora import LoRAError
from tests.parity import PROMPTS, hf_greedy

MAX_TOKENS = 10


def make_adapter(base_dir: Path, folder: Path, seed: int, r: int, targets: list[str], use_rslora: bool = False):
    """A PEFT LoRA adapter with random A and B (peft starts B at zero, which would change nothing)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets, lora_dropout=0.0,
                                            use_rslora=use_rslora))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.2)
    model.save_pretrained(folder)
    return model.merge_and_unload().eval()


@pytest.fixture(scope="module")
def adapters(tiny_llama_dir, tmp_path_factory):
    """Two adapters of different ranks and targets, each with its merged transformers model."""
    root = tmp_path_factory.mktemp("adapters")
    attn = make_adapter(tiny_llama_dir, root / "attn", seed=1, r=4, targets=["q_proj", "k_proj", "v_proj", "o_proj"])
    full = make_adapter(tiny_llama_dir, root / "full", seed=2, r=8, use_rslora=True,
                        targets=["q_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    return {"attn": (root / "attn", attn), "full": (root / "full", full)}


@pytest.fixture(scope="module")
def llm(tiny_llama_dir, restore_torch_threads):
    # A small step budget chunks prompts and mixes decodes with prefills.
    return LLM(str(tiny_llama_dir), dtype="float32", enable_lora=True, max_loras=2, max_lora_rank=8, num_kv_blocks=128,
               max_num_batched_tokens=24, block_size=4, num_threads=1)


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_peft_keys_are_what_the_adapter_holds(adapters):
    from safetensors import safe_open

    with safe_open(adapters["attn"][0] / "adapter_model.safetensors", "pt") as f:
        keys = set(f.keys())
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys
    assert json.loads((adapters["full"][0] / "adapter_config.json").read_text())["use_rslora"] is True


@pytest.mark.parametrize("name", ["attn", "full"])
def test_each_adapter_equals_peft_merged(llm, adapters, tokenizer, name):
    folder, merged = adapters[name]
    request = LoRARequest(name, 1 if name == "attn" else 2, str(folder))
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, prompt_logprobs=1, logprobs=0)
    prompt_ids = [tokenizer.encode(p) for p in PROMPTS]
    outputs = llm.generate(prompt_ids, params, lora_request=request)
    for ids, output in zip(prompt_ids, outputs):
        expected_tokens, expected_logprobs = hf_greedy(merged, tokenizer, ids, MAX_TOKENS)
        assert output.outputs[0].token_ids == expected_tokens, f"{name}: prompt {tokenizer.decode(ids)!r}"
        for position, entry in enumerate(output.prompt_logprobs[1:], start=1):
            token = ids[position]
            assert abs(entry[token].logprob - expected_logprobs[position - 1, token].item()) < 1e-4


def test_base_and_two_adapters_in_one_batch(llm, adapters, tokenizer):
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, logprobs=0)
    requests = [None, LoRARequest("attn", 1, str(adapters["attn"][0])), LoRARequest("full", 2, str(adapters["full"][0]))]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(9)]
    loras = [requests[i % 3] for i in range(9)]
    mixed = llm.generate(prompts, params, lora_request=loras)
    for prompt, lora, output in zip(prompts, loras, mixed):
        alone = llm.generate(prompt, params, lora_request=lora)[0]
        assert output.outputs[0].token_ids == alone.outputs[0].token_ids
        for ours, theirs in zip(output.outputs[0].logprobs, alone.outputs[0].logprobs):
            token = next(iter(ours))
            assert abs(ours[token].logprob - theirs[token].logprob) < 1e-5
    # ... and each row really got its own adapter: the same prompt differs under each
    same = llm.generate([PROMPTS[2]] * 3, params, lora_request=requests)
    assert len({tuple(output.outputs[0].token_ids) for output in same}) == 3


def test_prefix_cache_blocks_are_never_shared_across_adapters(llm, adapters, tokenizer):
    prompt = "Rome, Paris, Madrid, Berlin, Lisbon, Vienna, Prague and Warsaw are"   # several full blocks, unseen
    params = SamplingParams(temperature=0, max_tokens=4)
    attn = LoRARequest("attn", 1, str(adapters["attn"][0]))
    full = LoRARequest("full", 2, str(adapters["full"][0]))
    base = llm.generate(prompt, params)[0]
    assert llm.generate(prompt, params)[0].num_cached_tokens > 0        # the base model's blocks are cached
    first = llm.generate(prompt, params, lora_request=attn)[0]
    assert first.num_cached_tokens == 0                                    # not the base model's blocks
    assert llm.generate(prompt, params, lora_request=full)[0].num_cached_tokens == 0
    again = llm.generate(prompt, params, lora_request=attn)[0]
    assert again.num_cached_tokens > 0                                     # but its own
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    assert base.outputs[0].token_ids == llm.generate(prompt, params)[0].outputs[0].token_ids


def test_bad_adapters_are_refused_and_nothing_is_loaded(llm, adapters, tmp_path):
    engine = llm.engine
    with pytest.raises(LoRAError, match="adapter_config.json"):
        engine.add_lora("missing", str(tmp_path / "nowhere"))
    big = tmp_path / "big"
    make_adapter(Path(engine.config.model), big, seed=3, r=16, targets=["q_proj"])
    with pytest.raises(LoRAError, match="max_lora_rank 8"):
        engine.add_lora("big", str(big))
    names = {adapter.name for adapter in engine.list_loras()}
    for name in ("attn", "full"):
        if name not in names:
            engine.add_lora(name, str(adapters[name][0]))
    with pytest.raises(LoRAError, match="--max-loras 2"):
        engine.add_lora("third", str(adapters["attn"][0]))
    with pytest.raises(LoRAError, match="does not exist"):
        engine.remove_lora("third")
    engine.remove_lora("attn")
    assert [adapter.name for adapter in engine.list_loras()] == ["full"]
    request = llm.processor.process("unloaded", "hi", SamplingParams(max_tokens=2), lora_name="attn")
    with pytest.raises(LoRAError, match="does not exist"):
        engine.add_request(request)
    assert not engine.has_unfinished_requests()


def test_lora_needs_enable_lora(tiny_llama_dir, adapters):
    llm = LLM(str(tiny_llama_dir), num_kv_blocks=16, num_threads=1)
    with pytest.raises(LoRAError, match="--enable-lora"):
        llm.generate("hi", SamplingParams(max_tokens=2), lora_request=LoRARequest("attn", 1, str(adapters["attn"][0])))


def test_adapter_on_a_packed_gguf_base_keeps_it_packed(smollm2_path, tmp_path, restore_torch_threads):
    """The adapter rides beside Q4_1 blocks (never merged into them) and matches peft merged into transformers'
    dequantized load of the same GGUF, within the base model's own parity tolerance (tests/test_parity.py)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tests.parity import check_parity, packed_atol

    base = AutoModelForCausalLM.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name,
                                                dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(4)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.05)
    model.save_pretrained(tmp_path / "adapter")
    merged = model.merge_and_unload().eval()
    llm = LLM(str(smollm2_path), dtype="float32", enable_lora=True, max_lora_rank=8, max_num_batched_tokens=32,
              num_kv_blocks=256)
    layer = llm.engine.runner.model.model.layers[0]
    assert layer.self_attn.qkv_proj.packed is not None and layer.self_attn.qkv_proj.weight is None
    request = LoRARequest("smol", 1, str(tmp_path / "adapter"))
    # Rounded prompt rows (packed_atol): this adapter's large random weights take the logprobs to 2.9e-3 off.
    adapted = check_parity(llm, merged, llm.get_tokenizer(), atol=packed_atol(2e-3, 5e-3), prompts=PROMPTS[:4],
                           lora_request=request)
    assert layer.self_attn.qkv_proj.packed is not None
    prompt_ids = [llm.get_tokenizer().encode(p) for p in PROMPTS[:4]]   # as check_parity sends them
    base_outputs = llm.generate(prompt_ids, SamplingParams(temperature=0, max_tokens=12))
    assert [o.outputs[0].token_ids for o in adapted] != [o.outputs[0].token_ids for o in base_outputs]


@pytest.mark.parametrize("split", [{"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}])
def test_lora_with_more_than_one_rank_is_refused_at_start_up(split):
    # adapters are loaded into the driver's model only: worker ranks would silently serve the base model
    with pytest.raises(ValueError, match="--enable-lora needs tensor_parallel_size 1 and pipeline_parallel_size 1"):
        EngineConfig(model="m", enable_lora=True, **split)
    EngineConfig(model="m", **split)   # without LoRA the split is fine
