"""A LoRA adapter's name as `model` on /v1/embeddings (and Ollama's /api/embed) and /v1/responses, as
vLLM applies it: the adapter's embedding of a pooling model, the adapter's answer on the Responses API,
and a 400 for embeddings from a model served for generation, adapter or not."""
from __future__ import annotations

import httpx
import openai
import pytest
import torch
import torch.nn.functional as F

from pagedserve import LLM, LoRARequest
from tests.server_process import ServerProcess
from tests.test_lora import make_adapter

TEXTS = ["The capital of France is Paris.", "A man is eating food while the band plays a slow song.", "x"]

pytestmark = pytest.mark.usefixtures("restore_torch_threads")


@pytest.fixture(scope="module")
def adapter(tiny_llama_dir, tmp_path_factory):
    """(folder, the merged transformers model) of one adapter on the tiny llama."""
    folder = tmp_path_factory.mktemp("pooling-adapter") / "sim"
    merged = make_adapter(tiny_llama_dir, folder, seed=4, r=4, targets=["q_proj", "v_proj", "down_proj"])
    return folder, merged


def _last_token_embeddings(model, tokenizer, texts: list[str]) -> list[torch.Tensor]:
    """What LAST pooling with normalisation gives: the final hidden state of the last token, unit length."""
    result = []
    for text in texts:
        with torch.no_grad():
            hidden = model.model(torch.tensor([tokenizer.encode(text)])).last_hidden_state[0, -1]
        result.append(F.normalize(hidden, dim=0))
    return result


@pytest.fixture(scope="module")
def references(tiny_llama_dir, adapter):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    return {"base": _last_token_embeddings(base, tokenizer, TEXTS),
            "sim": _last_token_embeddings(adapter[1], tokenizer, TEXTS)}


def test_offline_embed_through_an_adapter_matches_the_merged_model(tiny_llama_dir, adapter, references):
    # A small step budget chunks the prompts; base and adapter embed the same prompts in one batch, and the
    # prefix cache must not hand the adapter the base model's blocks (or the other way round).
    llm = LLM(str(tiny_llama_dir), runner="pooling", dtype="float32", enable_lora=True, max_loras=1,
              max_lora_rank=8, max_num_batched_tokens=16, block_size=4, num_threads=1)
    lora = LoRARequest("sim", 1, str(adapter[0]))
    outputs = llm.embed(TEXTS * 2, lora_request=[None] * len(TEXTS) + [lora] * len(TEXTS))
    for index, output in enumerate(outputs):
        expected = references["base" if index < len(TEXTS) else "sim"][index % len(TEXTS)]
        assert torch.allclose(torch.tensor(output.outputs.embedding), expected, atol=1e-5), index
    assert not torch.allclose(references["base"][1], references["sim"][1], atol=1e-3)   # the adapter matters
    again = llm.embed(TEXTS[1], lora_request=lora)[0].outputs.embedding   # now from the prefix cache
    assert torch.allclose(torch.tensor(again), references["sim"][1], atol=1e-5)


@pytest.fixture(scope="module")
def pooling_server(tiny_llama_dir, adapter):
    args = [str(tiny_llama_dir), "--served-model-name", "base", "--runner", "pooling", "--dtype", "float32",
            "--enable-lora", "--max-lora-rank", "8", "--lora-modules", f"sim={adapter[0]}"]
    with ServerProcess(args).running() as process:
        yield process


def test_embeddings_by_adapter_name(pooling_server, references):
    client = openai.OpenAI(base_url=pooling_server.url("/v1"), api_key="x")
    for name in ("base", "sim"):
        answer = client.embeddings.create(model=name, input=TEXTS)
        assert answer.model == name
        for item, expected in zip(answer.data, references[name]):
            assert torch.allclose(torch.tensor(item.embedding), expected, atol=1e-5), name
    ollama = httpx.post(pooling_server.url("/api/embed"), json={"model": "sim", "input": TEXTS[1]})
    assert ollama.status_code == 200, ollama.text
    assert torch.allclose(torch.tensor(ollama.json()["embeddings"][0]), references["sim"][1], atol=1e-5)
    legacy = httpx.post(pooling_server.url("/api/embeddings"), json={"model": "sim", "prompt": TEXTS[1]})
    assert legacy.status_code == 200, legacy.text
    assert torch.allclose(F.normalize(torch.tensor(legacy.json()["embedding"]), dim=0), references["sim"][1],
                          atol=1e-5)
    pooling_server.check_log()


@pytest.fixture(scope="module")
def generate_server(tiny_llama_dir, adapter):
    args = [str(tiny_llama_dir), "--served-model-name", "base", "--dtype", "float32", "--num-kv-blocks", "64",
            "--enable-lora", "--max-lora-rank", "8", "--lora-modules", f"sim={adapter[0]}"]
    with ServerProcess(args).running() as process:
        yield process


def test_responses_by_adapter_name(generate_server):
    client = openai.OpenAI(base_url=generate_server.url("/v1"), api_key="x")
    texts = {}
    for name in ("base", "sim"):
        response = client.responses.create(model=name, input="Tell me about France", max_output_tokens=12,
                                           temperature=0)
        chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Tell me about France"}],
                                              max_tokens=12, temperature=0)
        assert response.model == name
        assert response.output_text == chat.choices[0].message.content   # the same prompt, the same weights
        texts[name] = response.output_text
    assert texts["base"] != texts["sim"]
    streamed = client.responses.create(model="sim", input="Tell me about France", max_output_tokens=12,
                                       temperature=0, stream=True)
    deltas = [event.delta for event in streamed if event.type == "response.output_text.delta"]
    assert "".join(deltas) == texts["sim"]


def test_embeddings_from_a_generative_model_are_refused_for_its_adapters_too(generate_server):
    for name in ("base", "sim"):
        answer = httpx.post(generate_server.url("/v1/embeddings"), json={"model": name, "input": "hello"})
        assert answer.status_code == 400, answer.text
        assert "does not support Embeddings API" in answer.json()["error"]["message"]
    assert httpx.get(generate_server.url("/health")).status_code == 200
    generate_server.check_log()
