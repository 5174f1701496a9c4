"""Ollama's model-management API over HTTP with the `ollama` client: /api/pull (NDJSON progress, from a
loopback hub), /api/create, /api/copy, /api/delete, OLLAMA_MAX_LOADED_MODELS, and the `pagedserve pull
--url`, `cp` and `stop` commands. One server for the module (a tiny checkpoint, so loads are quick)."""
from __future__ import annotations

import os
import subprocess
import sys

import ollama
import pytest

from tests.fake_hub import FakeHub
from tests.server_process import ServerProcess, wait_until


@pytest.fixture(scope="module")
def hub(tiny_llama_dir):
    hub = FakeHub({"org/tiny": {path.name: path.read_bytes() for path in tiny_llama_dir.iterdir()
                                if path.is_file()}}).start()
    yield hub
    hub.stop()


@pytest.fixture(scope="module")
def server(hub, tiny_llama_dir, tmp_path_factory):
    home = tmp_path_factory.mktemp("hf-home")
    models = tmp_path_factory.mktemp("models")
    env = {"HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_HUB_DISABLE_XET": "1",
           "PAGEDSERVE_CACHE_DIR": str(home / "pagedserve"), "OLLAMA_MAX_LOADED_MODELS": "1",
           "OLLAMA_MODELS": str(models)}
    with ServerProcess([str(tiny_llama_dir), "--served-model-name", "tiny", "--max-model-len", "256",
                        "--kv-cache-space", "0.05"], env=env).running() as process:
        process.models_dir = models
        process.env = {**os.environ, **env}
        yield process


def client(server) -> ollama.Client:
    return ollama.Client(host=server.base_url)


def loaded(server) -> list[str]:
    return [model.model for model in client(server).ps().models]


def test_pull_streams_ollama_progress_then_serves_the_model(server, hub):
    events = list(client(server).pull("org/tiny", stream=True))
    statuses = [event.status for event in events]
    assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
    assert "verifying sha256 digest" in statuses and "writing manifest" in statuses
    progress = [event for event in events if event.digest]
    assert progress and all(event.status == f"pulling {event.digest.removeprefix('sha256:')[:12]}"
                            for event in progress)
    weights = [event for event in progress if event.digest.startswith("sha256:")]
    assert weights and weights[-1].completed == weights[-1].total > 0     # a safetensors shard, whole
    assert "org/tiny" in [model.model for model in client(server).list().models]
    answer = client(server).generate(model="org/tiny", prompt="hi", options={"num_predict": 2})
    assert answer.done
    assert loaded(server) == ["org/tiny"]          # OLLAMA_MAX_LOADED_MODELS=1 unloaded "tiny" first
    assert client(server).pull("org/tiny").status == "success"   # already there: nothing to download


def test_pull_of_a_missing_repo_is_an_error(server):
    with pytest.raises(ollama.ResponseError):
        client(server).pull("org/no-such-repo")
    import httpx

    lines = httpx.post(server.url("/api/pull"), json={"model": "org/no-such-repo"}, timeout=60).text.splitlines()
    assert lines[0] == '{"status": "pulling manifest"}' and '"error"' in lines[-1]


def test_create_copy_and_delete(server, tiny_llama_dir):
    result = client(server).create(model="pirate", from_=str(tiny_llama_dir), system="You are a pirate.",
                                   parameters={"temperature": 0.2})
    assert result.status == "success"
    assert (server.models_dir / "pirate.json").is_file()
    shown = client(server).show("pirate")
    assert "You are a pirate." in shown.modelfile and "temperature" in shown.parameters
    assert client(server).copy("pirate", "pirate2").status == "success"
    assert "You are a pirate." in client(server).show("pirate2").modelfile
    assert client(server).copy("tiny", "tiny-copy").status == "success"    # a model named on the command line
    assert client(server).generate(model="tiny-copy", prompt="hi", options={"num_predict": 1}).done
    assert client(server).delete("pirate2").status == "success"
    assert "pirate2" not in [model.model for model in client(server).list().models]
    with pytest.raises(ollama.ResponseError) as missing:
        client(server).delete("pirate2")
    assert missing.value.status_code == 404
    with pytest.raises(ollama.ResponseError) as refused:
        client(server).delete("tiny")
    assert refused.value.status_code == 400


def test_create_with_a_whole_modelfile(server, tiny_llama_dir):
    import httpx

    response = httpx.post(server.url("/api/create"), json={
        "name": "old-style", "modelfile": f"FROM {tiny_llama_dir}\nPARAMETER num_ctx 128\n", "stream": False})
    assert response.status_code == 200 and response.json() == {"status": "success"}
    bad = httpx.post(server.url("/api/create"), json={"model": "bad", "from": "/no/such/file.gguf", "stream": False})
    assert bad.status_code in (400, 404) and "error" in bad.json()


def test_stop_unloads_a_model(server):
    client(server).generate(model="tiny", prompt="hi", options={"num_predict": 1})
    assert "tiny" in loaded(server)
    result = subprocess.run([sys.executable, "-m", "pagedserve", "stop", "tiny", "--url", server.base_url],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    wait_until(lambda: "tiny" not in loaded(server), "tiny to unload")


def test_pull_and_cp_commands(server, tmp_path):
    result = subprocess.run([sys.executable, "-m", "pagedserve", "pull", "org/tiny", "--url", server.base_url],
                            capture_output=True, text=True, timeout=120, env=server.env)
    assert result.returncode == 0, result.stderr
    assert "success" in result.stderr
    local = subprocess.run([sys.executable, "-m", "pagedserve", "cp", "smollm2-135m-instruct", "mine",
                            "--models-dir", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert local.returncode == 0, local.stderr
    assert (tmp_path / "mine.json").is_file()
