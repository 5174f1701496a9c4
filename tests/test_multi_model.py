"""Several models in one server: SmolLM2 named on the command line (loaded at start-up) and `tiny-pirate`,
a Modelfile variant of a tiny random checkpoint in a models directory (loaded on first use). Then, in
process with two tiny checkpoints: --lazy-load, the engine freed on unload, and the API key on /api/*."""
from __future__ import annotations

import gc
import subprocess
import sys
import weakref
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Iterator

import httpx
import ollama
import pytest
from fastapi.testclient import TestClient

from pagedserve.config import EngineConfig, ServerConfig
from pagedserve.store.models_dir import create_model
from pagedserve.server.app import create_app
from tests.server_process import ServerProcess, wait_until

SMOL = "smollm2-135m-instruct"
PIRATE = "tiny-pirate"
TINY_VOCAB_SIZE = 400   # tests/conftest.py's tokenizer
PIRATE_MODELFILE = """FROM {folder}
PARAMETER temperature 0
PARAMETER num_predict 5
PARAMETER num_ctx 256
SYSTEM You are a pirate.
"""


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory, tiny_llama_dir) -> Path:
    directory = tmp_path_factory.mktemp("models")
    create_model(PIRATE, PIRATE_MODELFILE.format(folder=tiny_llama_dir), directory, directory)
    return directory


@pytest.fixture(scope="module")
def started(models_dir) -> Iterator[tuple[ServerProcess, list[str]]]:
    """The server, and the models /api/ps listed once it was ready (before any test asked for one)."""
    with ServerProcess([SMOL, "--models-dir", str(models_dir), "--max-model-len", "4096",
                        "--kv-cache-space", "0.25"]).running() as process:
        yield process, loaded(ollama.Client(host=process.base_url, timeout=300))
        process.check_log()      # what was logged after the last test


@pytest.fixture(scope="module")
def server(started) -> ServerProcess:
    return started[0]


@pytest.fixture(autouse=True)
def nothing_went_wrong_inside(request):
    """After every test of the server, no tracebacks and no leaked tasks in what it logged meanwhile."""
    yield
    if "server" in request.fixturenames:
        request.getfixturevalue("server").check_log()


@pytest.fixture(scope="module")
def client(server) -> ollama.Client:
    return ollama.Client(host=server.base_url, timeout=300)


def loaded(client: ollama.Client) -> list[str]:
    return [model.model for model in client.ps().models]


def unload_the_pirate(client: ollama.Client) -> None:
    assert client.generate(model=PIRATE, keep_alive=0).done_reason == "unload"
    assert PIRATE not in loaded(client)


def test_both_models_are_listed_and_only_the_named_one_is_loaded(started, client):
    server, loaded_at_start_up = started
    cards = httpx.get(server.url("/v1/models")).json()["data"]
    assert [card["id"] for card in cards] == [SMOL, PIRATE]
    assert [card["max_model_len"] for card in cards] == [4096, 256]   # num_ctx, within --max-model-len
    assert [model.model for model in client.list().models] == [SMOL, PIRATE]
    assert loaded_at_start_up == [SMOL]
    assert f"{PIRATE} as '{PIRATE}' (loads on first use, unloads after 5m idle)" in server.log()


def test_each_request_is_answered_by_the_model_it_names(server, client):
    unload_the_pirate(client)
    pirate = client.generate(model=PIRATE, prompt="Hello")
    smol = client.generate(model=SMOL, prompt="Hello", options={"temperature": 0, "num_predict": 5})
    assert pirate.load_duration > smol.load_duration         # it loaded on this first use
    assert max(pirate.context) < TINY_VOCAB_SIZE <= max(smol.context)
    assert pirate.eval_count == 5                              # PARAMETER num_predict
    again = client.generate(model=PIRATE, prompt="Hello")
    assert again.response == pirate.response                  # PARAMETER temperature 0
    # The OpenAI API picks by `model` too, and the Modelfile's SYSTEM starts every chat.
    tokens = httpx.post(server.url("/tokenize"), json={"model": PIRATE, "messages": [
        {"role": "user", "content": "Hi"}]}).json()["tokens"]
    assert max(tokens) < TINY_VOCAB_SIZE
    prompt = httpx.post(server.url("/detokenize"), json={"model": PIRATE, "tokens": tokens}).json()["prompt"]
    assert "You are a pirate." in prompt
    completion = httpx.post(server.url("/v1/chat/completions"), timeout=300, json={
        "model": PIRATE, "messages": [{"role": "user", "content": "Hello"}]}).json()
    assert completion["usage"]["completion_tokens"] == 5 and completion["model"] == PIRATE


def test_ps_shows_both_with_their_memory_context_and_expiry(client):
    client.generate(model=PIRATE, prompt="Hi")
    models = {model.model: model for model in client.ps().models}
    assert list(models) == [SMOL, PIRATE]                      # the longest to live first
    assert models[SMOL].context_length == 4096 and models[PIRATE].context_length == 256
    assert models[SMOL].size > 50_000_000 > models[PIRATE].size > 0
    assert all(model.size_vram == 0 for model in models.values())
    now = datetime.now(timezone.utc)
    assert models[SMOL].expires_at > now + timedelta(days=365 * 20)                     # loaded at start-up
    assert now + timedelta(minutes=4) < models[PIRATE].expires_at < now + timedelta(minutes=6)


def test_keep_alive_unloads_and_the_next_request_reloads(server, client):
    num_unloaded = server.log().count(f"unloaded {PIRATE}")
    client.generate(model=PIRATE, prompt="Hi", keep_alive="1s")
    wait_until(lambda: loaded(client) == [SMOL], f"{PIRATE} to unload after its 1 s keep_alive")
    loading = client.generate(model=PIRATE)                     # no prompt: just load it
    assert loading.done_reason == "load" and loaded(client) == [SMOL, PIRATE]
    unloading = client.chat(model=PIRATE, messages=[], keep_alive=0)
    assert unloading.done_reason == "unload" and loaded(client) == [SMOL]
    answer = client.chat(model=PIRATE, messages=[{"role": "user", "content": "Hi"}])
    assert answer.eval_count == 5 and loaded(client) == [SMOL, PIRATE]
    # The expiry's log line follows the engine's shutdown, after /api/ps already showed it unloaded.
    wait_until(lambda: server.log().count(f"unloaded {PIRATE}") == num_unloaded + 2, "two 'unloaded' log lines")
    assert client.chat(model=SMOL, messages=[{"role": "user", "content": "Hi"}], options={"num_predict": 2}).done


def test_ps_and_run_commands_against_the_server(server):
    ps = run_cli("ps", "--url", server.base_url)
    assert ps.splitlines()[0].split() == ["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]
    smol_row = next(line for line in ps.splitlines() if line.startswith(SMOL))
    assert "100% CPU" in smol_row and "4096" in smol_row and smol_row.endswith("Forever")
    answer = run_cli("run", PIRATE, "Hello", "--url", server.base_url)
    assert answer.strip()


def run_cli(*args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "pagedserve", *args], capture_output=True, text=True,
                            timeout=300, cwd=Path(__file__).parent.parent)
    assert result.returncode == 0, result.stderr
    return result.stdout


# ---- in process: --lazy-load, freeing the engine, the API key ----------------------------------------

def test_lazy_load_unload_frees_the_engine_and_the_key_guards_the_api(tiny_llama_dir, tiny_qwen2_dir,
                                                                      restore_torch_threads):
    engine_config = EngineConfig(num_kv_blocks=32, max_num_batched_tokens=256, num_threads=1)
    app = create_app(ServerConfig(lazy_load=True, api_key=("k",)), engine_config,
                     model_names=[str(tiny_llama_dir), str(tiny_qwen2_dir)])
    llama, qwen = tiny_llama_dir.name, tiny_qwen2_dir.name
    key = {"Authorization": "Bearer k"}
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200        # nothing to load at start-up
        assert client.get("/api/version").status_code == 200   # open, like /version
        refused = client.get("/api/tags")
        assert refused.status_code == 401 and set(refused.json()) == {"error"}
        assert [m["name"] for m in client.get("/api/tags", headers=key).json()["models"]] == [llama, qwen]
        assert client.get("/api/ps", headers=key).json() == {"models": []}
        chat = {"messages": [{"role": "user", "content": "hi"}], "stream": False,
                "options": {"num_predict": 2, "seed": 1}}
        answer = client.post("/api/chat", headers=key, json={"model": qwen, **chat})
        assert answer.status_code == 200 and answer.json()["eval_count"] == 2
        assert [m["name"] for m in client.get("/api/ps", headers=key).json()["models"]] == [qwen]
        model = app.state.server.models[qwen]
        engine = weakref.ref(model.client)
        unloaded = client.post("/api/generate", headers=key, json={"model": qwen, "keep_alive": 0})
        assert unloaded.json()["done_reason"] == "unload" and model.client is None
        gc.collect()
        assert engine() is None                                  # weights and KV cache are gone with it
        assert client.get("/api/ps", headers=key).json() == {"models": []}
        again = client.post("/api/chat", headers=key, json={"model": qwen, **chat})
        assert again.json()["message"]["content"] == answer.json()["message"]["content"]
