"""The app in-process with a tiny random-weight checkpoint: what needs a model other than SmolLM2
(no chat template, a --chat-template override, one that fails to load), generation_config defaults,
and CORS. Answers are gibberish; only shapes and statuses matter here."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from pagedserve.config import EngineConfig, ServerConfig
from pagedserve.server.app import create_app
from tests.server_process import wait_until


def serve(model: Path | str, on_fatal=None, **server_options) -> TestClient:
    engine_config = EngineConfig(model=str(model), num_kv_blocks=64, max_num_batched_tokens=256, num_threads=1)
    app = create_app(ServerConfig(**server_options), engine_config, on_fatal=on_fatal)
    return TestClient(app)


def wait_ready(client: TestClient, timeout: float = 120) -> None:
    status = wait_until(lambda: (code := client.get("/health").status_code) != 503 and code, "the model to load",
                        timeout)
    assert status == 200


@pytest.fixture(scope="module")
def plain_model_dir(tiny_llama_dir, tmp_path_factory) -> Path:
    """The tiny checkpoint without a chat template (like Gemma 3's base model) and with generation defaults."""
    folder = tmp_path_factory.mktemp("no-template")
    shutil.copytree(tiny_llama_dir, folder, dirs_exist_ok=True)
    (folder / "chat_template.jinja").unlink(missing_ok=True)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config.pop("chat_template", None)
    config_path.write_text(json.dumps(config))
    (folder / "generation_config.json").write_text(json.dumps({"temperature": 0.0, "max_new_tokens": 3}))
    return folder


def test_model_without_a_chat_template(plain_model_dir):
    with serve(plain_model_dir) as client:
        wait_ready(client)
        response = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 400
        assert "no chat template" in response.json()["error"]["message"]
        assert "--chat-template" in response.json()["error"]["message"]
        body = {"prompt": "Hello", "max_tokens": None, "ignore_eos": True}
        completion = client.post("/v1/completions", json=body)
        assert completion.status_code == 200
        # generation_config.json: temperature 0 and 3 new tokens when the request says nothing.
        assert completion.json()["usage"]["completion_tokens"] == 3
        again = client.post("/v1/completions", json=body).json()
        assert again["choices"][0]["text"] == completion.json()["choices"][0]["text"]


def test_generation_config_vllm_ignores_the_models_defaults(plain_model_dir):
    with serve(plain_model_dir, generation_config="vllm") as client:
        wait_ready(client)
        body = {"prompt": "Hello", "max_tokens": 5, "ignore_eos": True}
        assert client.post("/v1/completions", json=body).json()["usage"]["completion_tokens"] == 5


def test_chat_template_override(tiny_llama_dir, tmp_path):
    template = tmp_path / "template.jinja"
    template.write_text("{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}[assistant]")
    app = create_app(ServerConfig(), EngineConfig(model=str(tiny_llama_dir), num_kv_blocks=64,
                                                  chat_template=str(template)))
    with TestClient(app) as client:
        wait_ready(client)
        tokens = client.post("/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}).json()["tokens"]
        assert client.post("/detokenize", json={"tokens": tokens}).json()["prompt"] == "[user] hi\n[assistant]"


def test_cors_preflight(tiny_llama_dir):
    with serve(tiny_llama_dir, allowed_origins=('["http://ui.example"]',), api_key=("k",)) as client:
        response = client.options("/v1/chat/completions", headers={
            "Origin": "http://ui.example", "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization"})
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "http://ui.example"
        other = client.options("/v1/chat/completions", headers={"Origin": "http://evil.example",
                                                                "Access-Control-Request-Method": "POST"})
        assert "access-control-allow-origin" not in other.headers


def test_a_model_that_fails_to_load(tmp_path):
    failures = []
    failed = threading.Event()

    def on_fatal(error: BaseException) -> None:
        failures.append(error)
        failed.set()

    with serve(tmp_path / "missing.gguf", on_fatal=on_fatal) as client:
        assert failed.wait(60), "on_fatal was not called within 60 s"
        health = client.get("/health")
        assert health.status_code == 500 and "failed to load" in health.json()["error"]["message"]
        assert client.post("/v1/completions", json={"prompt": "hi"}).status_code == 500
    assert len(failures) == 1


def test_the_command_exits_1_when_the_model_cannot_load(tmp_path):
    result = subprocess.run([sys.executable, "-m", "pagedserve", "serve", str(tmp_path / "missing.gguf"),
                             "--port", "0"], capture_output=True, text=True, timeout=180)
    assert result.returncode == 1
    assert "could not load" in result.stderr
