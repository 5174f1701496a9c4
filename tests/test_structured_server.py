"""Structured output and tool calls over HTTP with SmolLM2, through the clients people use: the openai
SDK's `response_format` (also `.parse(response_format=PydanticModel)`), vLLM's `structured_outputs` and
`guided_*` on chat and completions, Ollama's `format` through the ollama SDK; `tools` with tool_choice
required / named, whole and streamed, a round trip through a tool result, and Ollama's `tools`.

SmolLM2's chat template has no tools section, so every tool request here goes through the generic format
(llama-server's): the tools in the system prompt and a grammar that makes the answer a JSON call or
response. Which of the two SmolLM2-135M picks under tool_choice auto is its own choice, so the tests that
need a call force it with tool_choice; auto is checked for a well-formed answer either way."""
from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import jsonschema
import ollama
import openai
import pytest
from pydantic import BaseModel, Field

from tests.server_process import ServerProcess

NAME = "smollm2"

SCHEMAS = [
    {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20},
        "population": {"type": "integer", "minimum": 1000, "maximum": 50000000},
        "districts": {"type": "array", "items": {"type": "string", "maxLength": 12}, "minItems": 1, "maxItems": 3}},
     "required": ["city", "population", "districts"], "additionalProperties": False},
    {"type": "object", "properties": {
        "status": {"enum": ["open", "closed", "pending"]},
        "priority": {"type": "number", "minimum": 0, "maximum": 1},
        "owner": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                                   "id": {"type": "integer", "minimum": 1, "maximum": 999}},
                  "required": ["name", "id"], "additionalProperties": False}},
     "required": ["status", "priority", "owner"], "additionalProperties": False},
    {"type": "object", "properties": {
        "matrix": {"type": "array", "maxItems": 2,
                   "items": {"type": "array", "items": {"type": "integer", "minimum": -9, "maximum": 9},
                             "minItems": 1, "maxItems": 3}},
        "ok": {"type": "boolean"}},
     "required": ["matrix", "ok"], "additionalProperties": False},
    {"type": "object", "properties": {
        "colors": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "note": {"type": "string", "maxLength": 16}},
     "required": ["colors"], "additionalProperties": False},
]


class Capital(BaseModel):
    country: str = Field(max_length=20)
    capital: str = Field(max_length=20)
    continent: Literal["Europe", "Asia", "Africa", "America", "Oceania"]


@pytest.fixture(scope="module")
def server():
    with ServerProcess(["smollm2-135m-instruct", "--served-model-name", NAME, "--max-model-len", "2048",
                        "--kv-cache-space", "0.3", "--enable-auto-tool-choice",
                        "--tool-call-parser", "hermes"]).running() as process:
        yield process
        process.check_log()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url("/v1"), api_key="na", max_retries=0, timeout=600)


def ask(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def test_fifty_json_schema_requests_at_concurrency_eight_all_validate(client):
    def one(index: int) -> tuple[dict, str, str | None]:
        schema = SCHEMAS[index % len(SCHEMAS)]
        response = client.chat.completions.create(
            model=NAME, messages=ask(f"Give me example {index} as JSON."), max_tokens=120, temperature=0.8,
            seed=index, response_format={"type": "json_schema",
                                         "json_schema": {"name": f"s{index % 4}", "schema": schema, "strict": True}})
        choice = response.choices[0]
        return schema, choice.message.content or "", choice.finish_reason

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(50)))
    for schema, content, finish_reason in answers:
        assert finish_reason == "stop", content
        jsonschema.validate(json.loads(content), schema)


def test_openai_sdk_parse_returns_the_pydantic_object(client):
    completion = client.chat.completions.parse(model=NAME, messages=ask("What is the capital of France?"),
                                               response_format=Capital, max_tokens=80, temperature=0)
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Capital)


def test_json_object_and_vllm_structured_outputs_on_chat(client):
    response = client.chat.completions.create(model=NAME, messages=ask("Describe a cat in JSON."), max_tokens=60,
                                              temperature=0, response_format={"type": "json_object"})
    assert response.choices[0].message.content.lstrip().startswith("{")
    choices = ["positive", "negative", "neutral"]
    response = client.chat.completions.create(model=NAME, messages=ask("Sentiment of 'I love it'?"), max_tokens=10,
                                              n=3, temperature=1.0, extra_body={"structured_outputs": {"choice": choices}})
    assert all(choice.message.content in choices for choice in response.choices)
    response = client.chat.completions.create(model=NAME, messages=ask("A date?"), max_tokens=20, temperature=0.7,
                                              extra_body={"guided_regex": r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"})
    assert re.fullmatch(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", response.choices[0].message.content)


def test_completions_take_structured_outputs_and_legacy_guided_fields(client):
    regex = r"[a-z]+@[a-z]+\.(com|org)"
    response = client.completions.create(model=NAME, prompt="My email address is", max_tokens=30, temperature=0.9,
                                         n=2, extra_body={"structured_outputs": {"regex": regex}})
    assert all(re.fullmatch(regex, choice.text) for choice in response.choices)
    schema = SCHEMAS[3]
    response = client.completions.create(model=NAME, prompt="Colors as JSON:", max_tokens=60, temperature=0,
                                         extra_body={"guided_json": schema})
    jsonschema.validate(json.loads(response.choices[0].text), schema)
    response = client.completions.create(model=NAME, prompt="Sum:", max_tokens=20, temperature=0,
                                         extra_body={"guided_grammar": 'root ::= [1-9] " + " [1-9] " = " [0-9]+'})
    assert re.fullmatch(r"[1-9] \+ [1-9] = [0-9]+", response.choices[0].text)


def test_streamed_structured_output_parses_when_joined(client):
    stream = client.chat.completions.create(model=NAME, messages=ask("A city as JSON."), max_tokens=120,
                                            temperature=0, stream=True,
                                            response_format={"type": "json_schema",
                                                             "json_schema": {"name": "city", "schema": SCHEMAS[0]}})
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    jsonschema.validate(json.loads(text), SCHEMAS[0])


def test_bad_schemas_are_400_and_the_server_keeps_serving(client):
    for body in [{"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": 5}}}},
                 {"extra_body": {"structured_outputs": {"grammar": "root ::= ("}}},
                 {"extra_body": {"structured_outputs": {"json": {"minimum": "ten"}}}}]:
        with pytest.raises(openai.BadRequestError) as raised:
            client.chat.completions.create(model=NAME, messages=ask("hi"), max_tokens=5, **body)
        assert "structured_outputs" in str(raised.value) or "schema" in str(raised.value)
    assert client.chat.completions.create(model=NAME, messages=ask("hi"), max_tokens=3).choices[0].message.content


def test_ollama_format_schema_and_json(server):
    client = ollama.Client(host=server.base_url, timeout=600)
    response = client.chat(model=NAME, messages=ask("What is the capital of France?"),
                           format=Capital.model_json_schema(), options={"temperature": 0, "num_predict": 80})
    Capital.model_validate_json(response.message.content)
    generated = client.generate(model=NAME, prompt="A city as JSON", format=SCHEMAS[0],
                                options={"temperature": 0.5, "num_predict": 120})
    jsonschema.validate(json.loads(generated.response), SCHEMAS[0])
    streamed = "".join(part.message.content for part in client.chat(
        model=NAME, messages=ask("A dog as JSON"), format="json", stream=True, options={"num_predict": 60}))
    assert streamed.lstrip().startswith("{")
    with pytest.raises(ollama.ResponseError) as bad:
        client.chat(model=NAME, messages=ask("hi"), format={"type": "objectt"})
    assert bad.value.status_code == 400


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME_TOOL = {"type": "function", "function": {
    "name": "get_time", "description": "Current time in a time zone",
    "parameters": {"type": "object", "properties": {"zone": {"type": "string", "maxLength": 20}},
                   "required": ["zone"], "additionalProperties": False}}}
TOOLS = [WEATHER_TOOL, TIME_TOOL]
PARAMETERS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
WEATHER_QUESTION = ask("What is the weather in Paris?")


def test_required_tool_choice_returns_valid_calls(client, server):
    response = client.chat.completions.create(model=NAME, messages=WEATHER_QUESTION, tools=TOOLS,
                                              tool_choice="required", max_tokens=120, temperature=0)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls
    for call in choice.message.tool_calls:
        assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
        jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])
    assert "generic system prompt" in server.log()


def test_auto_tool_choice_answers_in_the_generic_format_whole_and_streamed(client, server):
    """tool_choice auto on a template without tools: whatever SmolLM2 picks, a call of a known tool with
    valid arguments (finish_reason tool_calls) or plain content, never the format's JSON."""
    questions = ["What is the weather in Paris? Use the get_weather tool.", "Write a haiku about the sea.",
                 "Hello! How are you?"]
    kinds = set()
    for question in questions:
        response = client.chat.completions.create(model=NAME, messages=ask(question), tools=TOOLS, max_tokens=100,
                                                  temperature=0)
        choice = response.choices[0]
        streamed = client.chat.completions.create(model=NAME, messages=ask(question), tools=TOOLS, max_tokens=100,
                                                  temperature=0, stream=True)
        content, names, finish = "", [], None
        for chunk in streamed:
            for part in chunk.choices:
                content += part.delta.content or ""
                names += [d.function.name for d in part.delta.tool_calls or [] if d.function and d.function.name]
                finish = part.finish_reason or finish
        if choice.message.tool_calls:
            kinds.add("call")
            assert choice.finish_reason == "tool_calls" and choice.message.content is None
            for call in choice.message.tool_calls:
                jsonschema.validate(json.loads(call.function.arguments), PARAMETERS[call.function.name])
            assert finish == "tool_calls" and names == [c.function.name for c in choice.message.tool_calls]
        else:
            kinds.add("content")
            assert choice.message.content and not choice.message.content.lstrip().startswith('{"response"')
            assert finish == choice.finish_reason and content == choice.message.content and not names
    assert kinds == {"call", "content"}, kinds     # greedy SmolLM2 calls for the first and answers the last


def test_streamed_required_tool_calls_arrive_as_openai_sends_them(client):
    stream = client.chat.completions.create(model=NAME, messages=WEATHER_QUESTION, tools=TOOLS,
                                            tool_choice="required", parallel_tool_calls=False, max_tokens=120,
                                            temperature=0, stream=True)
    calls: dict[int, dict] = {}
    finish_reasons = []
    for chunk in stream:
        for choice in chunk.choices:
            for delta in choice.delta.tool_calls or []:
                if delta.id is not None:
                    assert delta.index not in calls and delta.type == "function" and delta.function.name
                    calls[delta.index] = {"name": delta.function.name, "arguments": delta.function.arguments or ""}
                else:
                    calls[delta.index]["arguments"] += delta.function.arguments
            if choice.finish_reason:
                finish_reasons.append(choice.finish_reason)
    assert finish_reasons == ["tool_calls"]
    assert list(calls) == [0]          # parallel_tool_calls false: exactly one
    jsonschema.validate(json.loads(calls[0]["arguments"]), PARAMETERS[calls[0]["name"]])


def test_named_tool_choice_and_a_round_trip_through_the_tool_result(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    response = client.chat.completions.create(model=NAME, messages=WEATHER_QUESTION, tools=TOOLS,
                                              tool_choice=named, max_tokens=80, temperature=0)
    call = response.choices[0].message.tool_calls[0]
    assert call.function.name == "get_weather"
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, PARAMETERS["get_weather"])
    history = [*WEATHER_QUESTION, response.choices[0].message.model_dump(exclude_none=True),
               {"role": "tool", "tool_call_id": call.id, "content": json.dumps({"temperature": 21, "sky": "sunny"})}]
    final = client.chat.completions.create(model=NAME, messages=history, tools=TOOLS, tool_choice="none",
                                           max_tokens=40, temperature=0)
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls
    assert final.choices[0].finish_reason in ("stop", "length")


def test_bad_tools_are_400(client):
    for tools, tool_choice, words in [
        ([{"type": "function", "function": {"description": "no name"}}], "required", "has no name"),
        (TOOLS, {"type": "function", "function": {"name": "nope"}}, "not among the tools"),
        (TOOLS, "sometimes", "tool_choice must be"),
    ]:
        with pytest.raises(openai.BadRequestError, match=words):
            client.chat.completions.create(model=NAME, messages=WEATHER_QUESTION, tools=tools,
                                           tool_choice=tool_choice, max_tokens=5)


def test_ollama_tools_and_history(server):
    client = ollama.Client(host=server.base_url, timeout=600)
    answer = client.chat(model=NAME, messages=WEATHER_QUESTION, tools=TOOLS, options={"num_predict": 30})
    assert answer.done and (answer.message.content or answer.message.tool_calls)
    history = [*WEATHER_QUESTION,
               {"role": "assistant", "content": "", "tool_calls": [
                   {"function": {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}}]},
               {"role": "tool", "content": '{"temperature": 21}', "tool_name": "get_weather"}]
    final = client.chat(model=NAME, messages=history, tools=TOOLS, options={"num_predict": 120, "temperature": 0})
    # SmolLM2-135M may answer or call again; either way a whole answer in the generic format's JSON.
    assert final.done_reason == "stop" and (final.message.content or final.message.tool_calls)
    for call in final.message.tool_calls or []:
        jsonschema.validate(dict(call.function.arguments), PARAMETERS[call.function.name])
    # the call and its result went back to the model in the generic format (the log shows prompts as repr)
    call = {"tool_calls": [{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}]}
    result = {"tool_response": {"name": "get_weather", "content": '{"temperature": 21}'}}
    for text in (call, result):
        assert repr(json.dumps(text))[1:-1] in server.log()


def test_langchain_bind_tools_and_with_structured_output(server):
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(base_url=server.url("/v1"), api_key="na", model=NAME, temperature=0, max_tokens=80,
                      max_retries=0, timeout=600)
    message = chat.bind_tools([WEATHER_TOOL], tool_choice="get_weather").invoke("What is the weather in Paris?")
    assert [call["name"] for call in message.tool_calls] == ["get_weather"]
    jsonschema.validate(message.tool_calls[0]["args"], PARAMETERS["get_weather"])
    capital = chat.with_structured_output(Capital).invoke("What is the capital of France?")
    assert isinstance(capital, Capital)
