"""Hostile and careless clients against a live server (issue 16): no request kills or freezes it.

Each case sends the exact input, checks the 4xx and its shape (OpenAI's; Ollama's under /api/), checks
that a /health poller running beside it never waited a second, and that a normal request still works.
Faults are injected into a server process through tests/faulty_server.py.
"""
from __future__ import annotations

import json
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Iterator

import httpx
import pytest

from tests.faulty_server import FAULT_MARKER, FAULT_VARIABLE
from tests.server_process import ServerProcess, sse_events, wait_until

MODEL = "smollm2-135m-instruct"
ERROR_KEYS = {"message", "type", "param", "code"}
MAX_HEALTH_SECONDS = 1.0
# --shutdown-timeout 1 + uvicorn's 5 s margin + 10 s for the engines: the server's own bound, with room.
EXIT_BOUND_SECONDS = 30.0
SURROGATE_PROMPT = '"ab\\ud800cd"'   # as JSON text: a lone high surrogate between letters


@pytest.fixture(scope="module")
def server():
    with ServerProcess([MODEL, "--max-model-len", "2048", "--kv-cache-space", "0.25"]).running() as process:
        yield process


@pytest.fixture(scope="module")
def trusting_server():
    with ServerProcess([MODEL, "--max-model-len", "2048", "--kv-cache-space", "0.1",
                        "--trust-request-chat-template"]).running() as process:
        yield process


def post_raw(server: ServerProcess, path: str, body: str) -> httpx.Response:
    return httpx.post(server.url(path), content=body.encode(), headers={"Content-Type": "application/json"},
                      timeout=120)


def post(server: ServerProcess, path: str, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(server.url(path), json=body, timeout=300, **kwargs)


class HealthPoller:
    """GET /health in a loop on a thread; `worst` is the slowest answer's latency in seconds."""

    def __init__(self, server: ServerProcess) -> None:
        self._url = server.url("/health")
        self._stop = threading.Event()
        self.worst = 0.0
        self.num_polls = 0
        self.statuses: set[int] = set()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set():
                start = time.monotonic()
                self.statuses.add(client.get(self._url).status_code)
                self.worst = max(self.worst, time.monotonic() - start)
                self.num_polls += 1
                self._stop.wait(0.02)

    def __enter__(self) -> HealthPoller:
        self._thread.start()
        wait_until(lambda: self.num_polls > 0, "a first /health answer")
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


@contextmanager
def health_stays_responsive(server: ServerProcess) -> Iterator[HealthPoller]:
    with HealthPoller(server) as poller:
        yield poller
    assert poller.statuses == {200}, poller.statuses
    assert poller.worst < MAX_HEALTH_SECONDS, f"/health took {poller.worst:.2f} s"


def assert_still_serves(server: ServerProcess) -> None:
    response = post(server, "/v1/completions", {"prompt": "The capital of France is", "max_tokens": 3})
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["text"]
    server.wait_idle()


def assert_openai_error(response: httpx.Response, status: int, *words: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == ERROR_KEYS and error["code"] == status, error
    for word in words:
        assert word in error["message"], error
    assert "Error:" not in error["message"] and "Traceback" not in error["message"], error
    return error


def assert_ollama_error(response: httpx.Response, status: int, *words: str) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"} and isinstance(body["error"], str), body
    for word in words:
        assert word in body["error"], body
    return body["error"]


# ---- lone surrogates (the request that used to kill the engine) --------------------------------

def test_lone_surrogate_is_a_400_everywhere_and_the_server_keeps_serving(server):
    with health_stays_responsive(server):
        completion = post_raw(server, "/v1/completions", f'{{"prompt": {SURROGATE_PROMPT}, "max_tokens": 4}}')
        assert_openai_error(completion, 400, "surrogate", "\\ud800")
        chat = post_raw(server, "/v1/chat/completions",
                        f'{{"messages": [{{"role": "user", "content": {SURROGATE_PROMPT}}}], "max_tokens": 4}}')
        assert_openai_error(chat, 400, "surrogate")
        generate = post_raw(server, "/api/generate",
                            f'{{"model": "{MODEL}", "prompt": {SURROGATE_PROMPT}, "stream": false}}')
        assert_ollama_error(generate, 400, "surrogate")
        ollama_chat = post_raw(server, "/api/chat", f'{{"model": "{MODEL}", "messages": [{{"role": "user", '
                                                    f'"content": {SURROGATE_PROMPT}}}], "stream": false}}')
        assert_ollama_error(ollama_chat, 400, "surrogate")
    # a surrogate pair is one character (U+1F600) and fine
    paired = post_raw(server, "/v1/completions", '{"prompt": "smile \\ud83d\\ude00", "max_tokens": 2}')
    assert paired.status_code == 200, paired.text
    assert_still_serves(server)
    server.check_log()


# ---- injected faults ---------------------------------------------------------------------------

def faulty_server(fault: str, *args: str) -> ServerProcess:
    process = ServerProcess([MODEL, "--max-model-len", "1024", "--kv-cache-space", "0.1", *args],
                            env={FAULT_VARIABLE: fault})
    process.command[1:4] = ["-m", "tests.faulty_server", "serve"]
    return process


def test_a_fault_in_one_request_fails_only_that_request():
    with faulty_server("detokenizer").running() as server:
        with httpx.Client(timeout=300) as client, \
                client.stream("POST", server.url("/v1/completions"),
                              json={"prompt": "Count: 1, 2, 3,", "max_tokens": 40, "ignore_eos": True,
                                    "stream": True}) as healthy:
            lines = healthy.iter_lines()
            assert next(lines).startswith("data: ")   # the healthy stream is running
            whole = client.post(server.url("/v1/completions"),
                                json={"prompt": "Hi", "max_tokens": 8, "stop": [FAULT_MARKER]})
            error = assert_openai_error(whole, 500, "server log")
            assert "RuntimeError" not in error["message"] and "injected" not in error["message"]
            streamed = client.post(server.url("/v1/chat/completions"),
                                   json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8,
                                         "stop": [FAULT_MARKER], "stream": True})
            events = sse_events(streamed)
            assert "error" in events[-2] and events[-1] == "[DONE]", events
            rest = [line for line in lines if line.startswith("data: ")]
        assert rest[-1] == "data: [DONE]" and all("error" not in line for line in rest), rest[-3:]
        assert httpx.get(server.url("/health")).status_code == 200
        assert_still_serves(server)   # and the failed requests' blocks are free again
        log = server.log()
        assert log.count("injected detokenizer fault") >= 2 and "failed and was aborted" in log


def test_when_the_engine_loop_dies_health_fails_and_the_process_exits_nonzero():
    with faulty_server("engine-loop", "--shutdown-timeout", "1").running() as server:
        response = post(server, "/v1/completions", {"prompt": f"Hi {FAULT_MARKER}", "max_tokens": 4})
        assert response.status_code == 503, response.text
        assert response.json()["error"]["message"] == "the engine has stopped"
        died = time.monotonic()
        # until the process is gone, /health never says 200 again
        while server.process.poll() is None and time.monotonic() - died < EXIT_BOUND_SECONDS:
            try:
                assert httpx.get(server.url("/health"), timeout=5).status_code >= 500
            except httpx.TransportError:   # no longer listening
                break
        try:
            code = server.process.wait(timeout=EXIT_BOUND_SECONDS)
        except subprocess.TimeoutExpired:
            pytest.fail(f"the server still runs {EXIT_BOUND_SECONDS} s after its engine died:\n{server.log()[-3000:]}")
        assert code != 0, server.log()[-3000:]
        assert "the engine loop died" in server.log()



# ---- malformed input is a 400, never a 500 -----------------------------------------------------

def test_deeply_nested_json_is_a_400(server):
    deep = "[" * 10_000 + "]" * 10_000
    with health_stays_responsive(server):
        chat = post_raw(server, "/v1/chat/completions",
                        f'{{"messages": [{{"role": "user", "content": "hi"}}], "chat_template_kwargs": {{"x": {deep}}}}}')
        assert_openai_error(chat, 400, "128 levels deep")
        assert_ollama_error(post_raw(server, "/api/chat", f'{{"model": "{MODEL}", "messages": {deep}}}'), 400,
                            "levels deep")
        just_over = "[" * 129 + "]" * 129
        assert_openai_error(post_raw(server, "/v1/completions", f'{{"prompt": "hi", "stop": {just_over}}}'), 400,
                            "levels deep")
    assert_still_serves(server)
    server.check_log()


def test_unknown_chat_roles_are_refused_as_openai_does(server):
    response = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"},
                                                                  {"role": "wizard", "content": "abracadabra"}]})
    error = assert_openai_error(response, 400, "Invalid value: 'wizard'", "'developer'")
    assert error["param"] == "messages.[1].role" and error["type"] == "BadRequestError"
    tokenize = post(server, "/tokenize", {"messages": [{"role": "wizard", "content": "hi"}]})
    assert assert_openai_error(tokenize, 400)["param"] == "messages.[0].role"
    # the roles OpenAI keeps all render
    for role in ("system", "developer", "user", "assistant", "tool"):
        counted = post(server, "/tokenize", {"messages": [{"role": role, "content": "hi"},
                                                          {"role": "user", "content": "ok"}]})
        assert counted.status_code == 200, (role, counted.text)
    server.check_log()


def test_ollama_null_options_and_fields(server):
    for body in ({"options": None}, {"options": None, "keep_alive": None, "format": None, "think": None}):
        response = post(server, "/api/generate", {"model": MODEL, "prompt": "Hi", "stream": False, **body,
                                                  "options": None})
        assert response.status_code == 200, response.text
    bad = post(server, "/api/chat", {"model": MODEL, "messages": [{"role": "user", "content": "hi"}],
                                     "options": {"num_predict": "many"}, "stream": False})
    assert_ollama_error(bad, 400, "num_predict")
    nulls = post(server, "/api/chat", {"model": MODEL, "messages": None, "stream": False})
    assert nulls.status_code in (200, 400), nulls.text
    server.check_log()


# ---- request templates and big prompts: nothing unbounded on the event loop or a worker ---------

UNTRUSTED = "Chat template is passed with request, but --trust-request-chat-template is not set."
HI = [{"role": "user", "content": "hi"}]


def test_request_chat_templates_are_refused_unless_trusted(server):
    template = "{{ 'x' * 10**8 }}"
    assert_openai_error(post(server, "/v1/chat/completions", {"messages": HI, "chat_template": template}), 400,
                        UNTRUSTED)
    assert_openai_error(post(server, "/v1/chat/completions",
                             {"messages": HI, "chat_template_kwargs": {"chat_template": template}}), 400, UNTRUSTED)
    assert_openai_error(post(server, "/tokenize", {"messages": HI, "chat_template": template}), 400, UNTRUSTED)
    assert_ollama_error(post(server, "/api/generate", {"model": MODEL, "prompt": "hi", "template": template,
                                                       "stream": False}), 400, UNTRUSTED)
    # Ollama's own kind of template (Go) is part of its API and stays accepted
    go = post(server, "/api/generate", {"model": MODEL, "prompt": "The capital of France is",
                                        "template": "{{ .Prompt }}", "stream": False, "options": {"num_predict": 2}})
    assert go.status_code == 200, go.text
    server.check_log()


@pytest.mark.parametrize("template, words", [
    ("{{ 'x' * 10**8 }}", ("characters",)),
    ("{% for i in range(99999) %}{% for j in range(2000) %}{% endfor %}{% endfor %}", ("took more than",)),
])
def test_trusted_request_templates_are_still_bounded(trusting_server, template, words):
    with health_stays_responsive(trusting_server):
        response = post(trusting_server, "/v1/chat/completions", {"messages": HI, "chat_template": template})
    assert_openai_error(response, 400, *words)
    fine = post(trusting_server, "/v1/chat/completions", {
        "messages": HI, "max_tokens": 2,
        "chat_template": "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"})
    assert fine.status_code == 200, fine.text
    assert_still_serves(trusting_server)
    trusting_server.check_log()


def test_huge_prompts_are_refused_before_tokenizing(server):
    huge = "hello world " * (20 * 2**20 // 12)   # 20 MB
    with health_stays_responsive(server):
        chat = post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": huge}]})
        assert_openai_error(chat, 400, "characters", "2048 tokens")
        completion = post(server, "/v1/completions", {"prompt": huge, "max_tokens": 2})
        assert_openai_error(completion, 400, "characters", "2048 tokens")
        ollama = post(server, "/api/generate", {"model": MODEL, "prompt": huge, "stream": False})
        assert_ollama_error(ollama, 400, "characters")
    # a prompt that fits is tokenized and answered as before
    fits = post(server, "/v1/completions", {"prompt": "hello world " * 300, "max_tokens": 2})
    assert fits.status_code == 200, fits.text
    assert_still_serves(server)
    server.check_log()


# ---- load shedding -------------------------------------------------------------------------------

REJECTED = 'pagedserve:requests_rejected_total{model_name="smollm2-135m-instruct",reason="%s"}'
SUCCEEDED = 'vllm:request_success_total{finished_reason="length",model_name="smollm2-135m-instruct"}'


@pytest.fixture(scope="module")
def strict_server():
    """Small limits everywhere, so each can be reached quickly."""
    with ServerProcess([MODEL, "--max-model-len", "1024", "--kv-cache-space", "0.1", "--max-num-seqs", "1",
                        "--max-waiting-requests", "2", "--max-queue-time", "4", "--timeout-request-header", "2",
                        "--timeout-keep-alive", "1", "--timeout-request-body", "2", "--default-max-tokens", "12",
                        "--allowed-origins", "https://ui.example", "--allow-credentials"]).running() as process:
        yield process


def test_excess_requests_get_503_with_retry_after_and_admitted_ones_finish(strict_server):
    server = strict_server
    # NOTE: on a loaded machine an admitted request may also wait past --max-queue-time (4 s) and be dropped
    # with a 503 of its own (reason queue_timeout): every 503 is counted under one of the two reasons.
    def refusals() -> float:
        return server.metric(REJECTED % "queue_full") + server.metric(REJECTED % "queue_timeout")

    before = (refusals(), server.metric(SUCCEEDED))
    body = {"prompt": "Count: 1, 2,", "max_tokens": 6, "ignore_eos": True, "temperature": 0}
    with ThreadPoolExecutor(10) as pool:
        responses = list(pool.map(lambda _: post(server, "/v1/completions", body), range(10)))
    statuses = sorted(response.status_code for response in responses)
    assert set(statuses) == {200, 503}, statuses
    for response in responses:
        if response.status_code == 503:
            error = assert_openai_error(response, 503, "server busy")
            assert error["type"] == "ServiceUnavailableError"
            assert int(response.headers["retry-after"]) > 0
        else:   # nothing admitted is lost: each answer is whole
            assert response.json()["usage"]["completion_tokens"] == 6
    num_ok, num_refused = statuses.count(200), statuses.count(503)
    server.wait_for_metrics({SUCCEEDED: before[1] + num_ok})
    wait_until(lambda: refusals() == before[0] + num_refused, lambda: f"{num_refused} refusals in /metrics")
    # and Ollama's clients see Ollama's shape
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda _: post(server, "/api/generate", {
            "model": MODEL, "prompt": "Hi", "stream": False, "options": {"num_predict": 6}}), range(8)))
    refused = [answer for answer in answers if answer.status_code == 503]
    assert refused and all(answer.status_code == 200 for answer in answers if answer not in refused)
    assert_ollama_error(refused[0], 503, "server busy")
    server.wait_idle()


def test_a_request_waiting_too_long_gets_503(strict_server):
    server = strict_server
    timeouts_before = server.metric(REJECTED % "queue_timeout")
    with httpx.Client(timeout=120) as client, client.stream(
            "POST", server.url("/v1/completions"),
            # NOTE: 1000 tokens outlast the 4 s wait on any machine; leaving the block aborts the rest.
            json={"prompt": "Count: 1, 2,", "max_tokens": 1000, "ignore_eos": True, "stream": True}) as long:
        lines = long.iter_lines()
        assert next(lines).startswith("data: ")
        waited = post(server, "/v1/completions", {"prompt": "Hi", "max_tokens": 2})
        assert_openai_error(waited, 503, "waited more than 4 s")
        assert waited.headers["retry-after"]
        more = [line for line, _ in zip(lines, range(6)) if line.startswith("data: ")]
        assert more and all("error" not in line for line in more)   # the running one is untouched
    assert server.metric(REJECTED % "queue_timeout") == timeouts_before + 1
    assert "waited more than 4 s for a place in the batch" in server.log()
    server.wait_idle()


# ---- safe defaults ----------------------------------------------------------------------------------

def preflight(server: ServerProcess, origin: str) -> httpx.Response:
    return httpx.options(server.url("/v1/chat/completions"), headers={
        "Origin": origin, "Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "authorization"})


def test_cors_allows_localhost_by_default_and_credentials_only_for_listed_origins(server, strict_server):
    for origin in ("http://localhost:3000", "http://127.0.0.1:8080", "https://localhost"):
        allowed = preflight(server, origin)
        assert allowed.status_code == 200 and allowed.headers["access-control-allow-origin"] == origin
        assert "access-control-allow-credentials" not in allowed.headers
    for origin in ("https://evil.example", "http://localhost.evil.example"):
        refused = preflight(server, origin)
        assert "access-control-allow-origin" not in refused.headers, refused.headers
        simple = httpx.get(server.url("/v1/models"), headers={"Origin": origin})
        assert "access-control-allow-origin" not in simple.headers
    listed = preflight(strict_server, "https://ui.example")
    assert listed.headers["access-control-allow-origin"] == "https://ui.example"
    assert listed.headers["access-control-allow-credentials"] == "true"
    assert "access-control-allow-origin" not in preflight(strict_server, "https://evil.example").headers


def test_credentials_need_an_explicit_origin_list():
    result = subprocess.run([*ServerProcess([MODEL]).command, "--allow-credentials", "--allowed-origins", "*"],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0 and "explicit allowed_origins list" in result.stdout + result.stderr


def read_until_closed(sock: socket.socket, timeout: float = 15.0) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection, and how long that took."""
    sock.settimeout(timeout)
    start, received = time.monotonic(), b""
    while chunk := sock.recv(4096):
        received += chunk
    return received, time.monotonic() - start


def test_connections_that_send_nothing_or_slowly_are_closed(strict_server):
    address = ("127.0.0.1", strict_server.port)
    with socket.create_connection(address) as silent:
        received, seconds = read_until_closed(silent)
    assert received.startswith(b"HTTP/1.1 408") and seconds < 10
    with socket.create_connection(address) as slow:
        slow.sendall(b"GET /health HTTP/1.1\r\n")
        slow.settimeout(0.5)
        start, received = time.monotonic(), b""
        for byte in b"Host: 127.0.0.1\r\nX-Slow: " + b"a" * 100:   # a byte every 0.5 s, never finishing
            try:
                slow.sendall(bytes([byte]))
                received += slow.recv(4096)
            except socket.timeout:
                continue
            except OSError:   # closed while sending
                break
            if not received or received.endswith(b"\n"):
                break
        assert time.monotonic() - start < 10
    assert received.startswith(b"HTTP/1.1 408"), received
    with socket.create_connection(address) as kept:
        kept.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        received, seconds = read_until_closed(kept)
    assert received.startswith(b"HTTP/1.1 200") and seconds < 10   # closed by the 1 s keep-alive timeout
    with socket.create_connection(address) as half_body:
        half_body.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                          b"Content-Length: 100\r\n\r\n{\"prompt\": ")
        received, seconds = read_until_closed(half_body)
    assert received.startswith(b"HTTP/1.1 408") and b"timeout-request-body" in received and seconds < 10
    assert httpx.get(strict_server.url("/health")).status_code == 200
    strict_server.check_log()


def test_requests_without_a_limit_get_the_default_output_cap(strict_server):
    chat = post(strict_server, "/v1/chat/completions", {"messages": HI, "ignore_eos": True})
    assert chat.json()["usage"]["completion_tokens"] == 12
    asked = post(strict_server, "/v1/chat/completions", {"messages": HI, "ignore_eos": True, "max_tokens": 20})
    assert asked.json()["usage"]["completion_tokens"] == 20   # a request may still ask for more
    for options in (None, {}):
        ollama = post(strict_server, "/api/generate", {"model": MODEL, "prompt": "Count: 1, 2, 3,", "raw": True,
                                                       "stream": False, "options": options})
        assert ollama.status_code == 200 and ollama.json()["eval_count"] <= 12, ollama.text
    helped = subprocess.run([*ServerProcess([]).command[:4], "--help"], capture_output=True, text=True, timeout=120)
    assert "--default-max-tokens" in helped.stdout and "--max-waiting-requests" in helped.stdout
    strict_server.wait_idle()


def test_refusals_and_aborts_are_logged_with_reason_and_request_id(server):
    refused = post(server, "/v1/chat/completions", {"messages": HI, "temperature": "hot"},
                   headers={"X-Request-Id": "trace-4711"})
    assert refused.status_code == 400 and refused.headers["x-request-id"] == "trace-4711"
    logged = server.wait_for_log("Request trace-4711 (POST /v1/chat/completions) answered 400: temperature")
    assert "Traceback" not in logged
    with httpx.Client(timeout=60) as client, client.stream(
            "POST", server.url("/v1/completions"),
            json={"prompt": "Count: 1, 2,", "max_tokens": 300, "ignore_eos": True, "stream": True}) as stream:
        first = next(stream.iter_lines())
    request_id = json.loads(first.removeprefix("data: "))["id"]
    server.wait_for_log(f"Aborted request {request_id}-0: the client disconnected")
    server.wait_idle()
    server.check_log()
