"""The server as deployment guides run it: their command line and curl calls, API keys, a reasoning
parser, and SIGTERM. One server for the module; the last test stops it."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time

import httpx
import openai
import pytest

from pagedserve.server.reasoning import split_reasoning
from tests.server_process import ServerProcess, sse_events

KEYS = ("OPENWEBUI123", "my-secret-key")
NAME = "DeepSeek-R1-1.5B"
# Few-shot turns that make SmolLM2 answer greedily in the same "<think>…</think>answer" form.
THINKING = [message for a in (2, 3, 5) for message in (
    {"role": "user", "content": f"What is {a}+{a}?"},
    {"role": "assistant", "content": f"<think>{a}+{a}={2 * a}</think>{2 * a}"})] + [
    {"role": "user", "content": "What is 4+4?"}]

pytestmark = pytest.mark.skipif(shutil.which("curl") is None, reason="the guides' calls are curl commands")


@pytest.fixture(scope="module")
def server():
    # The first command line of ../shared/seed-requests.md, as written (MODEL: the embedded SmolLM2), plus
    # a second key, a reasoning parser, a cap on answers that give no max_tokens (the guide's first call
    # gives none, and this machine is slow), and a short shutdown grace for the SIGTERM test.
    with ServerProcess([
        "smollm2-135m-instruct", "--served_model_name", NAME, "--max_model_len", "2048",
        "--tensor-parallel-size", "1", "--dtype=half", "--gpu-memory-utilization=0.9", "--api_key", KEYS[0],
        "--api-key", KEYS[1], "--reasoning-parser", "qwen3", "--override-generation-config",
        '{"max_new_tokens": 48}', "--shutdown-timeout", "2", "--kv-cache-space", "0.25"]).running() as process:
        yield process


def curl(*args: str) -> tuple[int, str]:
    """(HTTP status, body) of a curl command line from the guides."""
    result = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", *args], capture_output=True, text=True,
                            timeout=600, check=True)
    body, _, status = result.stdout.rpartition("\n")
    return int(status), body


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def test_guide_chat_call_without_max_tokens(server):
    status, body = curl(server.url("/v1/chat/completions"), "-H", "Content-Type: application/json",
                        "-H", f"Authorization: Bearer {KEYS[0]}", "-d", json.dumps({
                            "model": NAME,
                            "messages": [{"role": "system", "content": "世界上最高的山峰是哪座山？"},
                                         {"role": "user", "content": "你好"}]}, ensure_ascii=False))
    assert status == 200, body
    result = json.loads(body)
    message = result["choices"][0]["message"]
    assert message["role"] == "assistant" and (message["content"] or message["reasoning_content"])
    assert result["model"] == NAME and 1 <= result["usage"]["completion_tokens"] <= 48


def test_guide_models_and_health_calls(server):
    status, body = curl(server.url("/v1/models"), "-H", f"Authorization: Bearer {KEYS[1]}")
    assert status == 200
    card = json.loads(body)["data"][0]
    assert (card["id"], card["max_model_len"], card["owned_by"]) == (NAME, 2048, "pagedserve")
    assert curl(server.url("/health")) == (200, "")


@pytest.mark.parametrize("method, path", [("GET", "/v1/models"), ("POST", "/v1/chat/completions"),
                                          ("POST", "/v1/completions"), ("POST", "/tokenize"),
                                          ("POST", "/detokenize")])
@pytest.mark.parametrize("headers", [{}, bearer("wrong"), {"Authorization": "Basic OPENWEBUI123"}])
def test_routes_need_a_key(server, method, path, headers):
    response = httpx.request(method, server.url(path), headers=headers, json={}, timeout=60)
    assert response.status_code == 401
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == 401


def test_open_routes_and_accepted_keys(server):
    for path in ("/health", "/metrics", "/version"):
        assert httpx.get(server.url(path)).status_code == 200
    for headers in (bearer(KEYS[0]), bearer(KEYS[1]), {"x-api-key": KEYS[1]}):
        assert httpx.get(server.url("/v1/models"), headers=headers).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url("/v1"), api_key="wrong", max_retries=0).models.list()
    log = server.log()
    assert KEYS[0] not in log and KEYS[1] not in log


def test_reasoning_split_whole_and_streamed(server):
    client = openai.OpenAI(base_url=server.url("/v1"), api_key=KEYS[0], max_retries=0, timeout=300)
    # The same prompt through completions gives the raw text the parser splits.
    token_ids = httpx.post(server.url("/tokenize"), headers=bearer(KEYS[0]), json={"messages": THINKING}).json()["tokens"]
    raw = client.completions.create(model=NAME, prompt=token_ids, temperature=0, max_tokens=16).choices[0].text
    assert "<think>" in raw and "</think>" in raw
    reasoning, content = split_reasoning("qwen3", raw)
    whole = client.chat.completions.create(model=NAME, messages=THINKING, temperature=0, max_tokens=16)
    message = whole.choices[0].message
    assert (message.model_extra["reasoning_content"], message.content) == (reasoning, content)
    assert message.model_extra["reasoning"] == reasoning and reasoning and content
    chunks = list(client.chat.completions.create(model=NAME, messages=THINKING, temperature=0, max_tokens=16,
                                                 stream=True))
    deltas = [chunk.choices[0].delta for chunk in chunks]
    streamed_reasoning = "".join((delta.model_extra or {}).get("reasoning_content") or "" for delta in deltas)
    assert streamed_reasoning == reasoning
    assert "".join(delta.content or "" for delta in deltas) == content
    plain = client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "Hi"}], temperature=0,
                                           max_tokens=4)
    assert plain.choices[0].message.model_extra["reasoning_content"] is None and plain.choices[0].message.content


def test_sigterm_ends_streams_cleanly_and_exits_zero(server):
    body = {"model": NAME, "prompt": "Tell me a long story.", "max_tokens": 1000, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", server.url("/v1/completions"), json=body, headers=bearer(KEYS[0]),
                      timeout=60) as response:
        lines = response.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                break
        start = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        rest = sse_events(_Remaining(lines))
    assert rest[-1] == "[DONE]"
    assert server.process.wait(timeout=30) == 0
    assert time.monotonic() - start < 20
    assert "the server is shutting down" in json.dumps(rest[:-1])


class _Remaining:
    """The rest of an iter_lines() iterator, in the shape sse_events() reads."""

    def __init__(self, lines) -> None:
        self._lines = lines

    def iter_lines(self):
        return self._lines
