"""LoRA over HTTP as vLLM serves it: --enable-lora --lora-modules, the adapter chosen by the request's
model name through the openai SDK, /v1/models listing adapters with their base as parent, and adapters
loaded and unloaded at runtime (VLLM_ALLOW_RUNTIME_LORA_UPDATING=True)."""
from __future__ import annotations

import json

import httpx
import openai
import pytest

from pagedserve import LLM, LoRARequest, SamplingParams
from tests.server_process import ServerProcess
from tests.test_lora import make_adapter

PROMPT = "The capital of France is"


@pytest.fixture(scope="module")
def adapter_dirs(tiny_llama_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("server-adapters")
    make_adapter(tiny_llama_dir, root / "sql", seed=1, r=4, targets=["q_proj", "v_proj"])
    make_adapter(tiny_llama_dir, root / "chat", seed=2, r=8, targets=["o_proj", "down_proj"])
    make_adapter(tiny_llama_dir, root / "big", seed=3, r=32, targets=["q_proj"])
    return root


@pytest.fixture(scope="module")
def expected(tiny_llama_dir, adapter_dirs, restore_torch_threads):
    """The offline engine's greedy text for the base model and each adapter."""
    llm = LLM(str(tiny_llama_dir), dtype="float32", enable_lora=True, max_loras=2, num_kv_blocks=64, num_threads=1)
    params = SamplingParams(temperature=0, max_tokens=8)
    texts = {"base": llm.generate(PROMPT, params)[0].outputs[0].text}
    for index, name in enumerate(("sql", "chat"), start=1):
        request = LoRARequest(name, index, str(adapter_dirs / name))
        texts[name] = llm.generate(PROMPT, params, lora_request=request)[0].outputs[0].text
    assert len(set(texts.values())) == 3
    return texts


@pytest.fixture(scope="module")
def server(tiny_llama_dir, adapter_dirs):
    args = [str(tiny_llama_dir), "--served-model-name", "base", "--dtype", "float32", "--num-kv-blocks", "64",
            "--enable-lora", "--max-loras", "2", "--max-lora-rank", "16",
            "--lora-modules", f"sql={adapter_dirs / 'sql'}"]
    with ServerProcess(args, env={"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True"}).running() as process:
        yield process


def test_adapter_by_model_name_and_listing(server, adapter_dirs, expected):
    client = openai.OpenAI(base_url=server.url("/v1"), api_key="x")
    cards = {card.id: card for card in client.models.list().data}
    assert cards["sql"].parent == "base" and cards["sql"].root == str(adapter_dirs / "sql")
    assert cards["base"].parent is None
    for name in ("base", "sql"):
        answer = client.completions.create(model=name, prompt=PROMPT, max_tokens=8, temperature=0)
        assert answer.choices[0].text == expected[name]
        assert answer.model == name
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="chat", prompt=PROMPT, max_tokens=2)
    # Ollama's routes pick the adapter by name too
    ollama = httpx.post(server.url("/api/generate"), json={"model": "sql", "prompt": PROMPT, "raw": True,
                                                            "stream": False,
                                                            "options": {"temperature": 0, "num_predict": 8}})
    assert ollama.status_code == 200 and ollama.json()["response"] == expected["sql"]


def test_load_and_unload_at_runtime(server, adapter_dirs, expected):
    client = openai.OpenAI(base_url=server.url("/v1"), api_key="x")
    load = server.url("/v1/load_lora_adapter")
    answer = httpx.post(load, json={"lora_name": "chat", "lora_path": str(adapter_dirs / "chat")})
    assert answer.status_code == 200, answer.text
    assert "chat" in {card.id for card in client.models.list().data}
    chat = client.chat.completions.create(model="chat", messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert chat.model == "chat"
    text = client.completions.create(model="chat", prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text
    assert text == expected["chat"]
    # already loaded; more than --max-loras; rank above --max-lora-rank; no adapter there
    assert httpx.post(load, json={"lora_name": "chat", "lora_path": str(adapter_dirs / "chat")}).status_code == 400
    full = httpx.post(load, json={"lora_name": "third", "lora_path": str(adapter_dirs / "chat")})
    assert full.status_code == 400 and "--max-loras" in full.json()["error"]["message"]
    unload = server.url("/v1/unload_lora_adapter")
    assert httpx.post(unload, json={"lora_name": "sql"}).status_code == 200
    big = httpx.post(load, json={"lora_name": "big", "lora_path": str(adapter_dirs / "big")})
    assert big.status_code == 400 and "max_lora_rank" in big.json()["error"]["message"]
    nowhere = httpx.post(load, json={"lora_name": "x", "lora_path": str(adapter_dirs / "nowhere")})
    assert nowhere.status_code == 400
    assert httpx.post(load, json={"lora_name": "x"}).status_code == 400
    assert httpx.post(unload, json={"lora_name": "sql"}).status_code == 404
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="sql", prompt=PROMPT, max_tokens=2)
    # the server kept serving throughout
    assert client.completions.create(model="base", prompt=PROMPT, max_tokens=8,
                                     temperature=0).choices[0].text == expected["base"]


def test_lora_modules_json_form_and_routes_off_without_the_variable(tiny_llama_dir, adapter_dirs):
    spec = json.dumps({"name": "sql", "path": str(adapter_dirs / "sql"), "base_model_name": "tiny"})
    args = [str(tiny_llama_dir), "--num-kv-blocks", "32", "--enable-lora", "--lora-modules", spec]
    with ServerProcess(args).running() as process:
        cards = {card["id"]: card for card in httpx.get(process.url("/v1/models")).json()["data"]}
        assert cards["sql"]["parent"] == "tiny"
        answer = httpx.post(process.url("/v1/load_lora_adapter"),
                            json={"lora_name": "chat", "lora_path": str(adapter_dirs / "chat")})
        assert answer.status_code == 404
