"""The Ollama API over real HTTP with SmolLM2, through the official `ollama` client unchanged, and the
seed-requests curl call. One server for the module; answers are kept to a few tokens (two cores)."""
from __future__ import annotations

import json
import shutil
import subprocess
from datetime import datetime, timedelta, timezone

import httpx
import ollama
import pytest

from tests.server_process import ServerProcess

NAME = "smollm2-135m-instruct"
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0, "num_predict": 8}
DONE_FIELDS = {"done_reason", "total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration",
               "eval_count", "eval_duration"}
ABORTED = f'vllm:request_success_total{{finished_reason="abort",model_name="{NAME}"}}'


@pytest.fixture(scope="module")
def server():
    with ServerProcess([NAME, "--max-model-len", "4096", "--kv-cache-space", "0.25", "--log-stats-interval",
                        "1"]).running() as process:
        yield process
        process.check_log()      # what was logged after the last test


@pytest.fixture(autouse=True)
def nothing_went_wrong_inside(server):
    """After every test, no tracebacks and no leaked tasks in what the server logged meanwhile."""
    yield
    server.check_log()


@pytest.fixture(scope="module")
def client(server) -> ollama.Client:
    return ollama.Client(host=server.base_url, timeout=300)


def post(server: ServerProcess, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url(path), json=body, timeout=300)


# ---- models ---------------------------------------------------------------------------------------

def test_version_list_show_and_ps(server, client):
    assert set(httpx.get(server.url("/api/version")).json()) == {"version"}
    [model] = client.list().models
    assert model.model == NAME and model.size > 50_000_000 and len(model.digest) == 64
    assert model.details.format == "gguf" and model.details.family == "llama"
    assert model.details.quantization_level == "Q4_1" and model.details.parameter_size == "135M"
    show = client.show(NAME)
    assert show.modelinfo["llama.context_length"] == 8192 and show.modelinfo["general.architecture"] == "llama"
    assert "<|im_start|>" in show.template and f"FROM {NAME}" in show.modelfile
    assert show.capabilities == ["completion"] and show.details.family == "llama"
    assert client.show(f"{NAME}:latest").modelinfo == show.modelinfo   # Ollama's default tag is understood
    [loaded] = client.ps().models
    assert loaded.model == NAME and loaded.size_vram == 0 and loaded.context_length == 4096
    assert loaded.size > model.size   # weights and the KV cache
    assert loaded.expires_at > datetime.now(timezone.utc) + timedelta(days=365 * 20)   # loaded at start: forever


# ---- chat and generate -----------------------------------------------------------------------------

def test_chat_whole_and_streamed_agree(client):
    whole = client.chat(model=NAME, messages=QUESTION, options=GREEDY)
    assert whole.message.role == "assistant" and "Paris" in whole.message.content
    assert whole.done and whole.done_reason in ("stop", "length") and 1 <= whole.eval_count <= 8
    assert whole.prompt_eval_count > 5 and whole.total_duration > whole.eval_duration > 0
    parts = list(client.chat(model=NAME, messages=QUESTION, options=GREEDY, stream=True))
    assert [part.done for part in parts] == [False] * (len(parts) - 1) + [True]
    assert "".join(part.message.content for part in parts) == whole.message.content
    assert parts[-1].message.content == "" and parts[-1].eval_count == whole.eval_count
    assert parts[-1].prompt_eval_count == whole.prompt_eval_count


def test_generate_whole_streamed_and_context(client):
    whole = client.generate(model=NAME, prompt="What is the capital of France?", options=GREEDY)
    assert "Paris" in whole.response and whole.done
    assert len(whole.context) == whole.prompt_eval_count + whole.eval_count
    streamed = list(client.generate(model=NAME, prompt="What is the capital of France?", options=GREEDY, stream=True))
    assert "".join(part.response for part in streamed) == whole.response and streamed[-1].done


def test_generate_raw_system_and_stop(server, client):
    raw = client.generate(model=NAME, prompt="1, 2, 3, 4,", raw=True, options={"temperature": 0, "num_predict": 4})
    assert raw.response.startswith(" 5") and raw.context is None
    stopped = client.generate(model=NAME, prompt="1, 2, 3, 4,", raw=True,
                              options={"temperature": 0, "num_predict": 12, "stop": [" 7"]})
    assert stopped.response == " 5, 6," and stopped.done_reason == "stop"
    system = "Answer in French."
    answer = client.generate(model=NAME, prompt="Hi", system=system, options={"temperature": 0, "num_predict": 1})
    messages = [{"role": "system", "content": system}, {"role": "user", "content": "Hi"}]
    assert answer.prompt_eval_count == post(server, "/tokenize", {"messages": messages}).json()["count"]


def test_num_predict_seed_and_temperature_zero(client):
    story = [{"role": "user", "content": "Tell me a long story about a dragon."}]
    capped = client.chat(model=NAME, messages=story, options={"num_predict": 3})
    assert capped.eval_count == 3 and capped.done_reason == "length"
    sampled = [client.chat(model=NAME, messages=story, options={"temperature": 1.0, "seed": 42, "num_predict": 8})
               for _ in range(2)]
    assert sampled[0].message.content == sampled[1].message.content
    greedy = {client.generate(model=NAME, prompt="Name a color.", options=GREEDY).response for _ in range(2)}
    assert len(greedy) == 1


def test_ndjson_wire_format(server):
    body = {"model": NAME, "prompt": "Hi", "options": {"num_predict": 4}}   # stream: true is Ollama's default
    with httpx.stream("POST", server.url("/api/generate"), json=body, timeout=300) as response:
        assert response.headers["content-type"] == "application/x-ndjson"
        lines = [json.loads(line) for line in response.iter_lines() if line]
    assert all(not line["done"] for line in lines[:-1]) and lines[-1]["done"]
    assert DONE_FIELDS <= set(lines[-1])
    assert all(isinstance(lines[-1][key], int) for key in DONE_FIELDS - {"done_reason"})
    assert lines[-1]["eval_count"] == 4 and lines[-1]["created_at"].endswith("Z")


@pytest.mark.skipif(shutil.which("curl") is None, reason="the guide's call is a curl command")
def test_seed_curl_call(server):
    """../shared/seed-requests.md's Ollama call as written (curl -d sends it form-encoded; it is JSON all the same)."""
    result = subprocess.run(["curl", "-s", server.url("/api/chat"), "-d", json.dumps(
        {"model": NAME, "messages": [{"role": "user", "content": "hi"}], "stream": False})],
        capture_output=True, text=True, timeout=600, check=True)
    answer = json.loads(result.stdout)
    assert set(answer) == {"model", "created_at", "message", "done"} | DONE_FIELDS
    assert answer["model"] == NAME and answer["done"] is True and answer["done_reason"] in ("stop", "length")
    assert answer["message"]["role"] == "assistant" and answer["message"]["content"]


# ---- errors -----------------------------------------------------------------------------------------

def test_errors_are_ollamas(server, client):
    with pytest.raises(ollama.ResponseError) as unknown:
        client.chat(model="llama3", messages=QUESTION)
    assert unknown.value.status_code == 404 and unknown.value.error == "model 'llama3' not found"
    with pytest.raises(ollama.ResponseError) as bad_type:
        client.chat(model=NAME, messages=QUESTION, options={"temperature": "hot"})
    assert bad_type.value.status_code == 400 and bad_type.value.error == 'option "temperature" must be of type float32'
    with pytest.raises(ollama.ResponseError) as streamed:
        list(client.generate(model=NAME, prompt="Hi", options={"num_predict": "many"}, stream=True))
    assert streamed.value.status_code == 400
    # (the SDK itself refuses a format other than "json" or a schema, so this one goes by hand)
    structured = post(server, "/api/chat", {"model": NAME, "messages": QUESTION, "format": "xml", "stream": False})
    assert structured.status_code == 400 and "invalid format" in structured.json()["error"]
    with pytest.raises(ollama.ResponseError, match="images are not supported") as images:
        client.generate(model=NAME, prompt="What is this?", images=[b"\x89PNG"])
    assert images.value.status_code == 400
    with pytest.raises(ollama.ResponseError) as pulled:
        client.pull("llama3")
    assert pulled.value.status_code == 404 and "not from Ollama's registry" in pulled.value.error
    assert client.pull(NAME).status == "success"
    for body, status in [({"messages": QUESTION}, 400), ({"model": NAME, "messages": "hi"}, 400),
                         ({"model": NAME, "messages": QUESTION, "keep_alive": "soon"}, 400)]:
        response = post(server, "/api/chat", body)
        assert response.status_code == status and set(response.json()) == {"error"}, response.text
    malformed = httpx.post(server.url("/api/generate"), content=b'{"model": ', timeout=60)
    assert malformed.status_code == 400 and set(malformed.json()) == {"error"}


def test_disconnected_stream_is_aborted(server):
    aborted_before = server.metric(ABORTED)
    body = {"model": NAME, "prompt": "Tell me a long story.", "options": {"num_predict": 4000}}
    with httpx.stream("POST", server.url("/api/generate"), json=body, timeout=300) as response:
        for index, _line in enumerate(response.iter_lines()):
            if index == 2:
                break
    server.wait_for_metrics({ABORTED: aborted_before + 1})
    server.wait_idle()
