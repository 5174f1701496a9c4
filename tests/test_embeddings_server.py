"""/v1/embeddings, /api/embed and /api/embeddings over HTTP with the real all-MiniLM-L6-v2, through the openai
and ollama SDKs, against sentence-transformers; and GET /v1/models/{id}."""
from __future__ import annotations

import httpx
import ollama
import openai
import pytest
import torch
import torch.nn.functional as F

from tests.server_process import ServerProcess
from tests.test_embeddings import minilm_dir

NAME = "minilm"
TEXTS = ["The capital of France is Paris.", "A man is eating food.", "你好，世界！"]


@pytest.fixture(scope="module")
def server():
    with ServerProcess([str(minilm_dir()), "--served-model-name", NAME, "--disable-log-requests"]).running() as process:
        yield process


@pytest.fixture(scope="module")
def expected():
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(str(minilm_dir()), device="cpu")
    return lambda texts: model.encode(texts, convert_to_tensor=True)


def assert_close(ours, theirs: torch.Tensor) -> None:
    ours = torch.tensor(ours, dtype=torch.float32)
    assert 1 - F.cosine_similarity(ours, theirs, dim=0).item() < 1e-5
    assert torch.allclose(ours, theirs, atol=1e-5)


def test_openai_sdk_embeddings(server, expected):
    client = openai.OpenAI(base_url=server.url("/v1"), api_key="none")
    # the SDK asks for base64 and decodes it itself
    response = client.embeddings.create(model=NAME, input=TEXTS)
    assert [item.index for item in response.data] == [0, 1, 2]
    for item, reference in zip(response.data, expected(TEXTS)):
        assert_close(item.embedding, reference)
    tokenizer_counts = sum(len(ids) for ids in _token_ids(server, TEXTS))
    assert response.usage.prompt_tokens == response.usage.total_tokens == tokenizer_counts
    single = client.embeddings.create(model=NAME, input=TEXTS[0], encoding_format="float")
    assert_close(single.data[0].embedding, expected([TEXTS[0]])[0])
    ids = _token_ids(server, TEXTS[:2])
    by_ids = client.embeddings.create(model=NAME, input=ids)
    for item, reference in zip(by_ids.data, expected(TEXTS[:2])):
        assert_close(item.embedding, reference)
    one_list = client.embeddings.create(model=NAME, input=ids[0])
    assert_close(one_list.data[0].embedding, expected([TEXTS[0]])[0])
    server.check_log()


def test_openai_embedding_errors(server):
    client = openai.OpenAI(base_url=server.url("/v1"), api_key="none")
    with pytest.raises(openai.BadRequestError, match="matryoshka"):
        client.embeddings.create(model=NAME, input="hi", dimensions=64)
    with pytest.raises(openai.BadRequestError, match="maximum context length is 256"):
        client.embeddings.create(model=NAME, input="word " * 400)
    with pytest.raises(openai.BadRequestError, match="input"):
        client.embeddings.create(model=NAME, input=[])
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="nope", input="hi")
    with pytest.raises(openai.BadRequestError, match="generate"):
        client.completions.create(model=NAME, prompt="hi", max_tokens=2)
    reply = httpx.post(server.url("/v1/embeddings"), json={"model": NAME, "input": "hi", "encoding_format": "int8"})
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "encoding_format"
    # vLLM's truncate_prompt_tokens keeps the end of a long input
    reply = httpx.post(server.url("/v1/embeddings"), json={"model": NAME, "input": "word " * 400,
                                                          "truncate_prompt_tokens": 100})
    assert reply.status_code == 200 and reply.json()["usage"]["prompt_tokens"] == 100
    server.check_log()


def test_ollama_sdk_embed(server, expected):
    client = ollama.Client(host=server.base_url)
    response = client.embed(model=NAME, input=TEXTS, keep_alive="5m")
    assert response.model == NAME and len(response.embeddings) == 3
    for ours, reference in zip(response.embeddings, expected(TEXTS)):
        assert_close(ours, reference)
    assert response.prompt_eval_count == sum(len(ids) for ids in _token_ids(server, TEXTS))
    assert response.total_duration > 0 and response.load_duration > 0
    one = client.embed(model=NAME, input=TEXTS[1])
    assert_close(one.embeddings[0], expected([TEXTS[1]])[0])
    # truncate (the default) cuts a long input at the context, as sentence-transformers does at max_seq_length
    long_text = "Embeddings turn sentences into vectors. " * 60
    truncated = client.embed(model=NAME, input=long_text)
    assert truncated.prompt_eval_count == 256
    assert_close(truncated.embeddings[0], expected([long_text])[0])
    with pytest.raises(ollama.ResponseError) as error:
        client.embed(model=NAME, input=long_text, truncate=False)
    assert error.value.status_code == 400
    server.check_log()


def test_ollama_legacy_embeddings(server, expected):
    client = ollama.Client(host=server.base_url)
    response = client.embeddings(model=NAME, prompt=TEXTS[0])
    raw = torch.tensor(response.embedding)
    # unnormalized, as Ollama's /api/embeddings returns it; the direction is sentence-transformers'
    assert raw.norm().item() > 1.5
    assert_close(F.normalize(raw, dim=0).tolist(), expected([TEXTS[0]])[0])
    assert httpx.post(server.url("/api/embeddings"), json={"model": NAME, "prompt": ""}).json() == {"embedding": []}
    missing = httpx.post(server.url("/api/embed"), json={"model": "nope", "input": "hi"})
    assert missing.status_code == 404 and "not found" in missing.json()["error"]


def test_ollama_show_says_embedding(server):
    assert ollama.Client(host=server.base_url).show(NAME).capabilities == ["embedding"]


def test_models_retrieve(server):
    client = openai.OpenAI(base_url=server.url("/v1"), api_key="none")
    model = client.models.retrieve(NAME)
    assert model.id == NAME and model.object == "model"
    assert model.model_extra["max_model_len"] == 256
    with pytest.raises(openai.NotFoundError) as error:
        client.models.retrieve("gpt-unknown")
    body = error.value.response.json()
    assert body["error"]["code"] == "model_not_found" and body["error"]["type"] == "invalid_request_error"


def test_generative_model_refuses_embeddings(chat_server):
    from tests.chat_server import API_KEY, MODEL_NAMES

    client = openai.OpenAI(base_url=chat_server.url("/v1"), api_key=API_KEY)
    with pytest.raises(openai.BadRequestError, match="does not support Embeddings API"):
        client.embeddings.create(model=MODEL_NAMES[0], input="hi")
    ollama_client = ollama.Client(host=chat_server.base_url, headers={"Authorization": f"Bearer {API_KEY}"})
    with pytest.raises(ollama.ResponseError, match="does not support embeddings"):
        ollama_client.embed(model=MODEL_NAMES[0], input="hi")
    assert client.models.retrieve(MODEL_NAMES[1]).id == MODEL_NAMES[1]


def _token_ids(server: ServerProcess, texts: list[str]) -> list[list[int]]:
    return [httpx.post(server.url("/tokenize"), json={"model": NAME, "prompt": text}).json()["tokens"]
            for text in texts]
