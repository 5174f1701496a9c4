"""Phi-3, GPT-2 (DialoGPT) and Granite against transformers on tiny random checkpoints, and PyTorch .bin
folders: loaded weights-only, a pickle that would run code refused."""
from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.models.registry import MODEL_REGISTRY
from tests.conftest import save_tiny_checkpoint
from tests.parity import MAX_TOKENS, PROMPTS, check_parity, hf_float_model, hf_greedy

# a small budget and small blocks: prompts are chunked, decodes share steps with prefills, and the
# repeated prefixes of the parity prompts hit the prefix cache
ENGINE_ARGS = dict(dtype="float32", max_num_batched_tokens=32, num_kv_blocks=256, block_size=4, num_threads=1)
SHAPE = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=512)

pytestmark = pytest.mark.usefixtures("restore_torch_threads")


def _config(family: str):
    from transformers import GPT2Config, GraniteConfig, Phi3Config

    if family == "phi3":
        return Phi3Config(**SHAPE, num_hidden_layers=2, pad_token_id=0, tie_word_embeddings=False)
    if family == "gpt2":
        return GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512)
    if family == "granite":
        return GraniteConfig(**SHAPE, num_hidden_layers=2, embedding_multiplier=2.0, residual_multiplier=0.5,
                             attention_multiplier=0.2, logits_scaling=0.5, tie_word_embeddings=True)
    raise ValueError(family)


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    folders: dict[str, Path] = {}

    def build(family: str) -> Path:
        if family not in folders:
            folder = tmp_path_factory.mktemp(f"tiny-{family}")
            folders[family] = save_tiny_checkpoint(folder, _config(family), seed=4, perturb_vectors=True)
        return folders[family]

    return build


@pytest.mark.parametrize("family, architecture", [
    ("phi3", "Phi3ForCausalLM"),
    ("gpt2", "GPT2LMHeadModel"),
    ("granite", "GraniteForCausalLM"),
])
def test_matches_transformers(family, architecture, tiny_folder):
    from transformers import AutoTokenizer

    folder = tiny_folder(family)
    llm = LLM(str(folder), **ENGINE_ARGS)
    assert llm.engine.model_config.architecture == architecture
    assert type(llm.engine.runner.model) is MODEL_REGISTRY[architecture]
    hf_model, tokenizer = hf_float_model(folder), AutoTokenizer.from_pretrained(folder)
    check_parity(llm, hf_model, tokenizer, atol=1e-3)
    _check_greedy_under_pressure(folder, hf_model, tokenizer)


def _check_greedy_under_pressure(folder: Path, hf_model, tokenizer) -> None:
    """Every prompt twice in one batch with too few KV blocks for all: the second copies hit the prefix
    cache, sequences are preempted and recomputed, and every answer is still transformers' greedy one."""
    llm = LLM(str(folder), **(ENGINE_ARGS | dict(num_kv_blocks=24)))
    prompt_ids = [tokenizer.encode(prompt) for prompt in PROMPTS] * 2
    outputs = llm.generate(prompt_ids, SamplingParams(temperature=0, max_tokens=MAX_TOKENS))
    for ids, output in zip(prompt_ids, outputs):
        assert output.outputs[0].token_ids == hf_greedy(hf_model, tokenizer, ids, MAX_TOKENS)[0]
    engine = llm.engine
    assert engine.block_manager.num_prefix_hits > 0 and engine.scheduler.num_preemptions > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def _as_bin_folder(folder: Path, target: Path) -> Path:
    """The checkpoint as transformers used to save it: pytorch_model.bin (torch.save of the state dict)."""
    from safetensors.torch import load_file

    shutil.copytree(folder, target)
    state = {}
    for file in target.glob("*.safetensors"):
        state.update(load_file(file))
        file.unlink()
    for index in target.glob("*.index.json"):
        index.unlink()
    torch.save(state, target / "pytorch_model.bin")
    return target


def test_pytorch_bin_folder_loads(tiny_folder, tmp_path):
    """DialoGPT ships pytorch_model.bin: the same weights from a .bin folder give transformers' tokens."""
    from transformers import AutoTokenizer

    folder = _as_bin_folder(tiny_folder("gpt2"), tmp_path / "dialogpt")
    llm = LLM(str(folder), **ENGINE_ARGS)
    check_parity(llm, hf_float_model(folder), AutoTokenizer.from_pretrained(folder), atol=1e-3)


class _Payload:
    """Unpickling this calls a function: what a malicious checkpoint does."""

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)


@pytest.mark.parametrize("writer", ["torch.save", "pickle"])
def test_pickle_with_code_is_refused(writer, tiny_folder, tmp_path):
    folder = _as_bin_folder(tiny_folder("gpt2"), tmp_path / "evil")
    marker = tmp_path / "code-ran"
    state = torch.load(folder / "pytorch_model.bin", weights_only=True)
    state["transformer.wte.weight"] = _Payload(marker)
    if writer == "torch.save":   # torch's zip format, as a real .bin is
        torch.save(state, folder / "pytorch_model.bin")
    else:
        with open(folder / "pytorch_model.bin", "wb") as file:
            pickle.dump(state, file, protocol=2)
    with pytest.raises(ValueError, match="refused: unpickling it would run code"):
        LLM(str(folder), **ENGINE_ARGS)
    assert not marker.exists()
