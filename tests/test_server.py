"""The OpenAI-compatible server over real HTTP, with SmolLM2 and the official `openai` SDK.

One server for the module, started with flags from deployment guides that cannot apply on this
machine (so their log lines are checked too). Generations are kept to a few tokens: the machine
has two cores.
"""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from tests.server_process import ServerProcess, sse_events, wait_until

NAMES = ("smollm2", "MODEL")
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
ERROR_KEYS = {"message", "type", "param", "code"}
ABORTED = 'vllm:request_success_total{finished_reason="abort",model_name="smollm2"}'


@pytest.fixture(scope="module")
def server():
    with ServerProcess([
        "smollm2-135m-instruct", "--served-model-name", *NAMES, "--dtype", "float16",
        "--max-model-len", "128000", "--kv-cache-space", "0.5", "--max-request-body-bytes", "1M",
        "--log-stats-interval", "1"]).running(until_ready=False) as process:
        yield process.wait_listening().wait_ready()
        process.check_log()      # what was logged after the last test


@pytest.fixture(autouse=True)
def nothing_went_wrong_inside(server):
    """Bad requests and disconnects are the client's business: after every test, no tracebacks and no
    leaked tasks in what the server logged meanwhile."""
    yield
    server.check_log()


# From the guides, as written (this server has no API key); "MODEL" is one of its served names.
GUIDE_CALL = {"model": "MODEL", "messages": [{"role": "system", "content": "你是一个有用的助手"},
                                             {"role": "user", "content": "你好"}], "max_tokens": 100, "temperature": 0.7}


@pytest.fixture(scope="module")
def guide_call(server):
    """The guide's 100-token call, sent at the start and left to run beside the next tests (batching
    makes that nearly free); its test collects the answer."""
    with ThreadPoolExecutor(1) as executor:
        yield executor.submit(post, server, "/v1/chat/completions", GUIDE_CALL)


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url("/v1"), api_key="na", max_retries=0, timeout=300)


def post(server: ServerProcess, path: str, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(server.url(path), json=body, timeout=300, **kwargs)


def chat_prompt_tokens(server: ServerProcess, messages: list[dict]) -> int:
    return post(server, "/tokenize", {"model": "MODEL", "messages": messages}).json()["count"]


# ---- start-up, open routes, models ----------------------------------------------------------------

def test_startup_logs_and_flags_that_cannot_apply(server, guide_call):
    # It listened while the model was still loading: /health said so, before the model's "Loaded" line.
    assert server.listening_health.status_code == 503
    assert server.listening_health.json()["error"]["message"] == "the model is loading"
    assert "Loaded smollm2" not in server.log_when_listening
    log = server.log()
    assert "Loaded smollm2" in log
    assert f"listening on http://127.0.0.1:{server.port}, serving smollm2-135m-instruct as 'smollm2', 'MODEL'" in log
    assert log.count("dtype float16 is not supported on CPU") == 1
    assert log.count("max_model_len 128000 exceeds") == 1


def test_health_version_models(server, client):
    assert httpx.get(server.url("/health")).status_code == 200
    assert httpx.get(server.url("/version")).json() == {"version": "0.1.0"}
    models = client.models.list().data
    assert [model.id for model in models] == list(NAMES)
    raw = httpx.get(server.url("/v1/models")).json()
    assert raw["object"] == "list"
    assert raw["data"][0]["max_model_len"] == 8192 and raw["data"][0]["owned_by"] == "pagedserve"
    assert raw["data"][0]["root"] == "smollm2-135m-instruct"


# ---- chat ---------------------------------------------------------------------------------------

def test_chat_answers_with_usage_and_logprobs(server, client):
    response = client.chat.completions.create(model="MODEL", messages=QUESTION, temperature=0, max_tokens=8,
                                              logprobs=True, top_logprobs=3)
    assert response.object == "chat.completion" and response.id.startswith("chatcmpl-")
    assert isinstance(response.created, int) and response.model == "MODEL"
    choice = response.choices[0]
    assert choice.message.role == "assistant" and "Paris" in choice.message.content
    assert choice.finish_reason in ("stop", "length")
    entries = choice.logprobs.content
    assert response.usage.prompt_tokens == chat_prompt_tokens(server, QUESTION)
    assert response.usage.completion_tokens == len(entries) >= 1
    assert response.usage.total_tokens == response.usage.prompt_tokens + response.usage.completion_tokens
    assert "".join(entry.token for entry in entries).startswith(choice.message.content)
    for entry in entries:
        assert len(entry.top_logprobs) == 3 and entry.bytes == list(entry.token.encode())
        values = [top.logprob for top in entry.top_logprobs]
        assert values == sorted(values, reverse=True) and entry.logprob <= 0
        assert entry.top_logprobs[0].token == entry.token        # greedy: the chosen token is the top one


def test_chat_without_max_tokens_runs_to_the_end_of_the_answer(client):
    response = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0)
    assert response.choices[0].finish_reason == "stop"
    assert "Paris" in response.choices[0].message.content


def test_chat_streaming_matches_the_whole_answer(server, client):
    whole = client.chat.completions.create(model="MODEL", messages=QUESTION, temperature=0, max_tokens=8)
    chunks = list(client.chat.completions.create(model="MODEL", messages=QUESTION, temperature=0, max_tokens=8,
                                                 stream=True, stream_options={"include_usage": True}))
    assert all(chunk.object == "chat.completion.chunk" and chunk.id == chunks[0].id for chunk in chunks)
    assert chunks[0].choices[0].delta.role == "assistant" and chunks[0].choices[0].delta.content == ""
    assert chunks[-2].choices[0].finish_reason == whole.choices[0].finish_reason
    assert all(chunk.choices[0].finish_reason is None for chunk in chunks[:-2])
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks[:-1])
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_streaming_wire_format_and_continuous_usage(server):
    body = {"model": "MODEL", "messages": QUESTION, "temperature": 0, "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True, "continuous_usage_stats": True}}
    with httpx.stream("POST", server.url("/v1/chat/completions"), json=body, timeout=300) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    events = [line for line in raw.split("\n\n") if line]
    assert all(event.startswith("data: ") for event in events)
    with httpx.stream("POST", server.url("/v1/chat/completions"), json=body, timeout=300) as response:
        chunks = sse_events(response)
    assert chunks[-1] == "[DONE]"
    usages = [chunk["usage"] for chunk in chunks[:-1]]
    assert all(usage is not None for usage in usages)
    completion_counts = [usage["completion_tokens"] for usage in usages]
    assert completion_counts == sorted(completion_counts) and completion_counts[-1] == 4


def test_n_and_seed_reproducibility(client):
    def ask():
        return client.chat.completions.create(model="MODEL", messages=[{"role": "user", "content": "Name a fruit."}],
                                              temperature=1.0, max_tokens=6, n=2, seed=1234)
    first, second = ask(), ask()
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]
    assert 2 <= first.usage.completion_tokens <= 12


def test_temperature_zero_is_deterministic(client):
    texts = {client.completions.create(model="smollm2", prompt="The capital of Italy is", temperature=0,
                                       max_tokens=6).choices[0].text for _ in range(2)}
    assert len(texts) == 1


def test_chat_content_parts_tool_messages_and_echo(client):
    messages = [{"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
                {"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]},
                {"role": "assistant", "content": "The answer is"}]
    response = client.chat.completions.create(model="MODEL", messages=messages, temperature=0, max_tokens=3,
                                              extra_body={"continue_final_message": True,
                                                          "add_generation_prompt": False, "echo": True})
    assert response.choices[0].message.content.startswith("The answer is")
    tool = client.chat.completions.create(model="MODEL", temperature=0, max_tokens=3, messages=[
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "weather", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}])
    assert tool.choices[0].message.content is not None


# ---- completions --------------------------------------------------------------------------------

def test_completion_prompt_forms(server, client):
    token_ids = post(server, "/tokenize", {"prompt": "The capital of France is"}).json()["tokens"]
    text = client.completions.create(model="smollm2", prompt="The capital of France is", temperature=0,
                                     max_tokens=3)
    assert text.object == "text_completion" and text.id.startswith("cmpl-") and "Paris" in text.choices[0].text
    assert text.usage.prompt_tokens == len(token_ids) and text.usage.completion_tokens == 3
    from_ids = client.completions.create(model="smollm2", prompt=token_ids, temperature=0, max_tokens=3)
    assert from_ids.choices[0].text == text.choices[0].text
    several = client.completions.create(model="smollm2", prompt=["The capital of France is", "1, 2, 3,"],
                                        temperature=0, max_tokens=3, n=2)
    assert [c.index for c in several.choices] == [0, 1, 2, 3]
    assert several.choices[0].text == several.choices[1].text == text.choices[0].text
    assert several.choices[2].text.startswith(" 4")
    several_ids = client.completions.create(model="smollm2", prompt=[token_ids, token_ids[:3]], temperature=0,
                                            max_tokens=3)
    assert several_ids.choices[0].text == text.choices[0].text
    assert several_ids.usage.prompt_tokens == len(token_ids) + 3


def test_completion_stop_strings(client):
    stopped = client.completions.create(model="smollm2", prompt="1, 2, 3, 4,", temperature=0, max_tokens=12,
                                        stop=[" 7", "never"])
    assert stopped.choices[0].text == " 5, 6,"
    assert stopped.choices[0].finish_reason == "stop" and stopped.choices[0].model_extra["stop_reason"] == " 7"
    kept = client.completions.create(model="smollm2", prompt="1, 2, 3, 4,", temperature=0, max_tokens=12,
                                     stop=" 7", extra_body={"include_stop_str_in_output": True})
    assert kept.choices[0].text == " 5, 6, 7"


def test_completion_logprobs_and_echo(client):
    response = client.completions.create(model="smollm2", prompt="1, 2, 3,", temperature=0, max_tokens=3,
                                         logprobs=2, echo=True)
    choice = response.choices[0]
    assert choice.text.startswith("1, 2, 3,")
    logprobs = choice.logprobs
    num_tokens = response.usage.prompt_tokens + response.usage.completion_tokens
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == len(logprobs.text_offset) == num_tokens
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert "".join(logprobs.tokens) == choice.text
    assert logprobs.text_offset == [len("".join(logprobs.tokens[:i])) for i in range(num_tokens)]
    for token, value, top in zip(logprobs.tokens[1:], logprobs.token_logprobs[1:], logprobs.top_logprobs[1:]):
        assert top[token] == value and 2 <= len(top) <= 3
    plain = client.completions.create(model="smollm2", prompt="1, 2, 3,", temperature=0, max_tokens=3, logprobs=0,
                                      extra_body={"prompt_logprobs": 1})
    assert len(plain.choices[0].logprobs.tokens) == 3 and plain.choices[0].text == choice.text[len("1, 2, 3,"):]
    prompt_logprobs = plain.choices[0].model_extra["prompt_logprobs"]
    assert len(prompt_logprobs) == response.usage.prompt_tokens and prompt_logprobs[0] is None
    assert all(1 <= len(position) <= 2 for position in prompt_logprobs[1:])


def test_completion_streaming_matches_and_counts(client):
    whole = client.completions.create(model="smollm2", prompt=["Hello, my name is", "1, 2,"], temperature=0,
                                      max_tokens=4, echo=True)
    chunks = list(client.completions.create(model="smollm2", prompt=["Hello, my name is", "1, 2,"], temperature=0,
                                            max_tokens=4, echo=True, stream=True,
                                            stream_options={"include_usage": True}))
    assert whole.choices[0].text.startswith("Hello, my name is") and whole.choices[1].text.startswith("1, 2,")
    texts = {0: "", 1: ""}
    for chunk in chunks[:-1]:
        assert chunk.object == "text_completion"
        texts[chunk.choices[0].index] += chunk.choices[0].text
    assert [texts[0], texts[1]] == [c.text for c in whole.choices]
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == whole.usage.total_tokens
    finishes = [c.choices[0].finish_reason for c in chunks[:-1] if c.choices[0].finish_reason]
    assert finishes == ["length", "length"]


def test_tokenize_and_detokenize(server):
    tokens = post(server, "/tokenize", {"model": "smollm2", "prompt": "Hello world", "return_token_strs": True}).json()
    assert tokens["count"] == len(tokens["tokens"]) == 2 and tokens["max_model_len"] == 8192
    assert len(tokens["token_strs"]) == 2
    assert post(server, "/detokenize", {"tokens": tokens["tokens"]}).json() == {"prompt": "Hello world"}


# ---- load: concurrency, disconnects, metrics, logs --------------------------------------------------

def test_guide_call_with_system_prompt_and_sampling(guide_call):
    response = guide_call.result()
    assert response.status_code == 200
    result = response.json()
    assert result["choices"][0]["message"]["content"]
    assert 1 <= result["usage"]["completion_tokens"] <= 100


def test_32_concurrent_streams_each_equal_the_request_alone(server, guide_call):
    guide_call.result()     # nothing else running: "alone" means alone
    prompts = ["The capital of France is", "1, 2, 3, 4,", "Once upon a time", "def add(a, b):"]
    body = {"model": "smollm2", "temperature": 0, "max_tokens": 5}
    alone = [post(server, "/v1/completions", {**body, "prompt": prompt}).json()["choices"][0]["text"]
             for prompt in prompts]

    async def stream_one(http: httpx.AsyncClient, prompt: str) -> str:
        async with http.stream("POST", "/v1/completions", json={**body, "prompt": prompt, "stream": True}) as response:
            assert response.status_code == 200
            text = ""
            async for line in response.aiter_lines():
                if line.startswith("data: {"):
                    text += httpx.Response(200, content=line[6:]).json()["choices"][0]["text"]
            return text

    async def all_at_once() -> list[str]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=300) as http:
            return await asyncio.gather(*(stream_one(http, prompts[i % 4]) for i in range(32)))

    results = asyncio.run(all_at_once())
    assert results == [alone[i % 4] for i in range(32)]


LONG = {"model": "smollm2", "max_tokens": 4000, "ignore_eos": True, "stream": True}


@pytest.mark.parametrize("path, body", [
    ("/v1/chat/completions", {**LONG, "messages": [{"role": "user", "content": "Tell me a long story."}], "n": 2}),
    ("/v1/completions", {**LONG, "prompt": ["Tell me a long story.", "Once upon a time"]}),
])
def test_disconnected_stream_frees_its_request_and_blocks(server, guide_call, path, body):
    guide_call.result()     # nothing else running: it must free every block
    aborted_before = server.metric(ABORTED)
    with httpx.stream("POST", server.url(path), json=body, timeout=300) as response:
        chunks = []
        for line in response.iter_lines():
            if line.startswith("data: "):
                chunks.append(line)
            if len(chunks) == 2:
                break
    server.wait_for_metrics({ABORTED: aborted_before + 1})
    server.wait_idle()


def test_disconnected_request_frees_its_blocks(server, guide_call):
    guide_call.result()
    aborted_before = server.metric(ABORTED)
    body = {"model": "smollm2", "prompt": "Tell me a long story.", "max_tokens": 4000, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url("/v1/completions"), json=body, timeout=2)   # the client gives up after 2 s
    server.wait_for_metrics({ABORTED: aborted_before + 1})
    server.wait_idle()


LENGTH_FINISHED = 'vllm:request_success_total{finished_reason="length",model_name="smollm2"}'
COUNTERS = ("vllm:generation_tokens_total", "vllm:time_to_first_token_seconds_count",
            "vllm:e2e_request_latency_seconds_count", "vllm:prefix_cache_queries_total", LENGTH_FINISHED)


def test_metrics_count_the_work_done(server):
    before = {name: server.metric(name) for name in COUNTERS}
    completion = post(server, "/v1/completions", {"model": "smollm2", "prompt": "Count: 1, 2,", "temperature": 0,
                                                  "max_tokens": 3, "ignore_eos": True}).json()
    assert completion["choices"][0]["finish_reason"] == "length"
    # The engine thread records a step's metrics just after handing out its outputs.
    wait_until(lambda: all(server.metric(name) > before[name] for name in COUNTERS),
               lambda: f"every counter to count the request: before {before}, now "
                       f"{ {name: server.metric(name) for name in COUNTERS} }")
    assert server.metric("vllm:generation_tokens_total") >= before["vllm:generation_tokens_total"] + 3
    assert server.metric("vllm:prompt_tokens_total") > 0
    text = httpx.get(server.url("/metrics")).text
    assert 'vllm:generation_tokens_total{model_name="smollm2"}' in text and LENGTH_FINISHED in text


def test_logs_requests_and_throughput(server, client):
    client.chat.completions.create(model="MODEL", messages=QUESTION, temperature=0, max_tokens=2)
    client.completions.create(model="smollm2", prompt="Hello", temperature=0, max_tokens=2)
    log = server.log()
    assert "Received request chatcmpl-" in log and "Finished request cmpl-" in log
    # The periodic line comes at the first engine step a second (--log-stats-interval) after the last one.
    log = server.wait_for_log("Avg prompt throughput: ", timeout=30)
    assert "tokens/s, Running: " in log and "Prefix cache hit rate: " in log


# ---- bad input: status, error shape, and the server keeps serving ---------------------------------

CHAT = {"model": "MODEL", "messages": QUESTION, "max_tokens": 2}
BAD_CHAT = [
    ({"temperature": -0.5}, 400, "temperature"),
    ({"top_p": 0}, 400, "top_p"),
    ({"top_p": 1.5}, 400, "top_p"),
    ({"n": 0}, 400, "n"),
    ({"max_tokens": 0}, 400, "max_tokens"),
    ({"max_completion_tokens": -1}, 400, "max_tokens"),
    ({"logit_bias": {"99999999": 1}}, 400, "logit_bias"),
    ({"logit_bias": {"hello": 1}}, 400, "logit_bias"),
    ({"logit_bias": {"5": 1000}}, 400, "logit_bias"),
    ({"temperature": "hot"}, 400, "temperature"),
    ({"messages": "hi"}, 400, "messages"),
    ({"messages": []}, 400, "messages"),
    ({"messages": [{"content": "no role"}]}, 400, None),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, None),
    ({"stop": 5}, 400, "stop"),
    ({"top_logprobs": 50, "logprobs": True}, 400, "top_logprobs"),
    ({"top_logprobs": 2}, 400, "top_logprobs"),
    ({"response_format": {"type": "xml"}}, 400, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {}}}, 400, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": "strin"}}}}, 400,
     "structured_outputs"),
    ({"structured_outputs": {"regex": "[a-"}}, 400, "structured_outputs"),
    ({"guided_choice": ["a"], "guided_regex": "a"}, 400, "guided_choice"),
    ({"stream_options": {"include_usage": True}}, 400, "stream_options"),
    ({"max_tokens": 9000}, 400, None),
    ({"model": "gpt-4"}, 404, "model"),
    ({"chat_template": "{{ raise_exception('no') }}"}, 400, None),
    ({"seed": 2**70}, 400, "seed"),
]


@pytest.mark.parametrize("change, status, param", BAD_CHAT)
def test_bad_chat_requests(server, change, status, param):
    response = post(server, "/v1/chat/completions", {**CHAT, **change})
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == ERROR_KEYS and error["code"] == status and error["message"]
    assert error["type"] == ("NotFoundError" if status == 404 else "BadRequestError")
    assert error["param"] == param


@pytest.mark.parametrize("change, param", [
    ({"prompt": []}, "prompt"), ({"prompt": [[]]}, "prompt"), ({"prompt": [1, "a"]}, "prompt"),
    ({"suffix": "end"}, "suffix"), ({"best_of": 3}, "best_of"), ({"logprobs": 21}, "logprobs"),
    ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"), ({"presence_penalty": 3}, "presence_penalty"),
])
def test_bad_completion_requests(server, change, param):
    response = post(server, "/v1/completions", {"model": "smollm2", "prompt": "hi", "max_tokens": 2, **change})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_unknown_model_message(server):
    response = post(server, "/v1/completions", {"model": "nope", "prompt": "hi"})
    assert response.status_code == 404
    assert response.json()["error"]["message"] == "The model `nope` does not exist."


@pytest.mark.parametrize("raw", [b'{"model": "MODEL", "messages": [', b"[1, 2]", b"not json", b"",
                                 b'{"model": "MODEL", "messages": [{"role": "user", "content": "x"}], "top_p": NaN}'])
def test_malformed_bodies_are_400_not_422(server, raw):
    response = httpx.post(server.url("/v1/chat/completions"), content=raw,
                          headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "BadRequestError"


def test_prompts_over_the_context_limit(server):
    long_prompt = "hello " * 8200
    alone = post(server, "/v1/completions", {"model": "smollm2", "prompt": long_prompt})
    assert alone.status_code == 400
    assert "maximum context length is 8192 tokens" in alone.json()["error"]["message"]
    with_output = post(server, "/v1/completions", {"model": "smollm2", "prompt": "hello " * 8000, "max_tokens": 500})
    assert with_output.status_code == 400
    assert "in the prompt, 500 in the completion" in with_output.json()["error"]["message"]
    bad_ids = post(server, "/v1/completions", {"model": "smollm2", "prompt": [1, 2, 10**9]})
    assert bad_ids.status_code == 400 and bad_ids.json()["error"]["param"] == "prompt"


def test_body_over_the_size_limit(server):
    response = post(server, "/v1/completions", {"model": "smollm2", "prompt": "x" * (2 * 2**20)})
    assert response.status_code == 413
    assert response.json()["error"]["code"] == 413


def test_sdk_raises_the_right_errors(client):
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(model="MODEL", messages=QUESTION, temperature=-1)
    assert bad.value.body["param"] == "temperature"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=QUESTION)


def test_server_still_serves_after_bad_requests(server, client, guide_call):
    guide_call.result()
    for change, status, _ in BAD_CHAT[::4]:
        assert post(server, "/v1/chat/completions", {**CHAT, **change}).status_code == status
    assert httpx.get(server.url("/health")).status_code == 200
    response = client.chat.completions.create(model="MODEL", messages=QUESTION, temperature=0, max_tokens=4)
    assert response.choices[0].message.content
    server.wait_idle()
