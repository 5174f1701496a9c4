"""Every supported family against transformers, on tiny random checkpoints built here (HF folder and GGUF).

Llama and Qwen2 (qkv bias) from HF folders are in test_parity.py. Sliding-window variants use an
8-token window and 4-token KV blocks, so most prompts and all generations reach past the window
and the window's edge falls inside a block. transformers runs with eager attention throughout.
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.loader.chat_template import render_chat_prompt
from pagedserve.config import ModelConfig
from pagedserve.loader.safetensors import load_hf_config
from pagedserve.models.registry import ENCODER_REGISTRY, MODEL_REGISTRY
from tests.conftest import build_tokenizer, save_tiny_checkpoint
from tests.parity import PROMPTS, check_parity, hf_float_model
from tests.tiny_gguf import write_tiny_gguf

WINDOW = 8
# NOTE: one thread: tiny models gain nothing from a second, and on a busy 2-core machine OpenMP threads
# waiting for each other make every tiny op ~20x slower (for transformers too: the engine sets torch's count).
ENGINE_ARGS = dict(dtype="float32", max_num_batched_tokens=32, num_kv_blocks=256, block_size=4, num_threads=1)
SHAPE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512)

pytestmark = pytest.mark.usefixtures("restore_torch_threads")


def _gemma3_text(**overrides) -> dict:
    """Sliding, global, sliding; global layers with linearly scaled rope on their own base."""
    return dict(SHAPE, num_hidden_layers=3, head_dim=32, query_pre_attn_scalar=32, sliding_window=WINDOW,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                rope_parameters={"full_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1000.0},
                                 "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}) | overrides


def _config(family: str):
    from transformers import Gemma3Config, Gemma3TextConfig, MistralConfig, Qwen3Config

    if family == "qwen3":  # head_dim 32 is not hidden / heads, as in real Qwen3
        return Qwen3Config(**SHAPE, num_hidden_layers=2, head_dim=32, tie_word_embeddings=True)
    if family == "mistral":
        return MistralConfig(**SHAPE, num_hidden_layers=2, sliding_window=WINDOW, tie_word_embeddings=False)
    if family == "gemma3":
        return Gemma3TextConfig(**_gemma3_text())
    if family == "gemma3-softcap":  # transformers ignores attn_logit_softcapping for Gemma 3; so must we
        return Gemma3TextConfig(**_gemma3_text(query_pre_attn_scalar=24, final_logit_softcapping=3.0,
                                               attn_logit_softcapping=2.0))
    if family == "gemma3-multimodal":
        tokenizer = build_tokenizer()
        text = _gemma3_text(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                            eos_token_id=tokenizer.eos_token_id)
        vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                      image_size=28, patch_size=14)
        return Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    raise ValueError(family)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """family -> its HF folder, built on first use."""
    folders: dict[str, Path] = {}

    def build(family: str) -> Path:
        if family not in folders:
            folder = tmp_path_factory.mktemp(f"tiny-{family}")
            folders[family] = save_tiny_checkpoint(folder, _config(family), seed=2, perturb_vectors=True)
        return folders[family]

    return build


@pytest.mark.parametrize("family, architecture, sliding_windows", [
    ("qwen3", "Qwen3ForCausalLM", (None, None)),
    ("mistral", "MistralForCausalLM", (WINDOW, WINDOW)),
    ("gemma3", "Gemma3ForCausalLM", (WINDOW, None, WINDOW)),
    ("gemma3-softcap", "Gemma3ForCausalLM", (WINDOW, None, WINDOW)),
    ("gemma3-multimodal", "Gemma3ForConditionalGeneration", (WINDOW, None, WINDOW)),
])
def test_hf_folder_matches_transformers(family, architecture, sliding_windows, tiny_folder):
    from transformers import AutoTokenizer

    folder = tiny_folder(family)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert max(len(tokenizer.encode(prompt)) for prompt in PROMPTS) > 3 * WINDOW
    llm = LLM(str(folder), **ENGINE_ARGS)
    config = llm.engine.model_config
    assert (config.architecture, config.sliding_windows) == (architecture, sliding_windows)
    assert type(llm.engine.runner.model) is MODEL_REGISTRY[architecture]
    check_parity(llm, hf_float_model(folder), tokenizer, atol=1e-3)


@pytest.mark.parametrize("architecture", ["llama", "gemma3"])
def test_gguf_matches_transformers(architecture, tiny_folder, tiny_llama_dir, tmp_path, monkeypatch):
    """The HF model written as llama.cpp would (Q/K rows permuted for llama, norms as 1 + w for Gemma 3,
    the tokenizer in the metadata) loads back to the same tokens and logits."""
    from transformers import AutoTokenizer

    # The tokenizer built from this throwaway file is cached here, not in the user's cache.
    monkeypatch.setattr("pagedserve.loader.tokenizer.pagedserve_cache_dir", lambda: tmp_path / "cache")
    folder = tiny_llama_dir if architecture == "llama" else tiny_folder(architecture)
    hf_model, tokenizer = hf_float_model(folder), AutoTokenizer.from_pretrained(folder)
    path = write_tiny_gguf(tmp_path / f"{architecture}.gguf", hf_model, architecture, tokenizer)
    llm = LLM(str(path), **ENGINE_ARGS)
    ours = llm.get_tokenizer()
    assert [ours.encode(prompt) for prompt in PROMPTS] == [tokenizer.encode(prompt) for prompt in PROMPTS]
    reference = ModelConfig.from_hf(load_hf_config(folder))
    # GGUF stores the epsilon as float32 (1e-6 comes back as 9.99999997e-07), as transformers' GGUF load sees too
    assert llm.engine.model_config.rms_norm_eps == pytest.approx(reference.rms_norm_eps, rel=1e-6)
    assert dataclasses.replace(llm.engine.model_config, rms_norm_eps=reference.rms_norm_eps) == reference
    check_parity(llm, hf_model, tokenizer, atol=1e-3)


def test_unknown_architecture_lists_the_supported_ones(tiny_llama_dir, tmp_path):
    folder = tmp_path / "phi"
    shutil.copytree(tiny_llama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps(config | {"architectures": ["PhiForCausalLM"]}))
    with pytest.raises(ValueError, match=r"unsupported model architecture 'PhiForCausalLM'; supported: ") as error:
        LLM(str(folder), **ENGINE_ARGS)
    supported = str(error.value).split("supported: ")[1].split(", ")
    assert supported == sorted({*MODEL_REGISTRY, *ENCODER_REGISTRY})


# DeepSeek-R1-Distill-Qwen's template, without the tool-call branches: reasoning is stripped from past
# assistant turns, and the generation prompt opens <think> so the model's output has no opening tag.
R1_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(system_prompt='') %}{%- for message in messages %}{%- if message['role'] == 'system' %}"
    "{% set ns.system_prompt = message['content'] %}{%- endif %}{%- endfor %}{{bos_token}}{{ns.system_prompt}}"
    "{%- for message in messages %}{%- if message['role'] == 'user' %}{{'<｜User｜>' + message['content']}}"
    "{%- endif %}{%- if message['role'] == 'assistant' %}{% set content = message['content'] %}"
    "{% if '</think>' in content %}{% set content = content.split('</think>')[-1] %}{% endif %}"
    "{{'<｜Assistant｜>' + content + '<｜end▁of▁sentence｜>'}}{%- endif %}{%- endfor -%}"
    "{% if add_generation_prompt %}{{'<｜Assistant｜><think>\\n'}}{% endif %}"
)


def test_r1_distill_qwen_chat_template_opens_think(tiny_qwen2_dir):
    llm = LLM(str(tiny_qwen2_dir), **ENGINE_ARGS, chat_template=R1_TEMPLATE)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "1 + 1?"},
                {"role": "assistant", "content": "<think>\nEasy.\n</think>\n\n2"},
                {"role": "user", "content": "2 + 2?"}]
    bos = llm.get_tokenizer().bos_token
    assert render_chat_prompt(llm.get_tokenizer(), messages) == (
        f"{bos}Be brief.<｜User｜>1 + 1?<｜Assistant｜>\n\n2<｜end▁of▁sentence｜>"
        "<｜User｜>2 + 2?<｜Assistant｜><think>\n")
    output = llm.chat(messages, SamplingParams(temperature=0, max_tokens=4))[0]
    assert len(output.outputs[0].token_ids) == 4
