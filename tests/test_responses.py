"""/v1/responses through the openai SDK's client.responses.create, whole and streamed, on SmolLM2: the same
greedy answer as /v1/chat/completions gives for the same messages."""
from __future__ import annotations

import openai
import pytest

from tests.chat_server import API_KEY, MODEL_NAMES

MODEL = MODEL_NAMES[0]
INSTRUCTIONS = "You answer in one short sentence."
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def client(chat_server):
    return openai.OpenAI(base_url=chat_server.url("/v1"), api_key=API_KEY)


@pytest.fixture(scope="module")
def chat_answer(client):
    completion = client.chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": QUESTION}],
        max_tokens=12, temperature=0)
    return completion


def test_response_matches_chat(client, chat_answer):
    response = client.responses.create(model=MODEL, instructions=INSTRUCTIONS, input=QUESTION, max_output_tokens=12,
                                       temperature=0)
    assert response.object == "response" and response.id.startswith("resp")
    assert response.output_text == chat_answer.choices[0].message.content
    assert response.output[0].type == "message" and response.output[0].role == "assistant"
    assert response.usage.input_tokens == chat_answer.usage.prompt_tokens
    assert response.usage.output_tokens == chat_answer.usage.completion_tokens
    expected_status = "incomplete" if chat_answer.choices[0].finish_reason == "length" else "completed"
    assert response.status == expected_status
    # the same conversation as input items with content parts; developer is the system role
    items = client.responses.create(model=MODEL, max_output_tokens=12, temperature=0, input=[
        {"role": "developer", "content": INSTRUCTIONS},
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": QUESTION}]}])
    assert items.output_text == response.output_text


def test_streamed_response(client, chat_answer):
    events = list(client.responses.create(model=MODEL, instructions=INSTRUCTIONS, input=QUESTION,
                                          max_output_tokens=12, temperature=0, stream=True))
    kinds = [event.type for event in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [event.sequence_number for event in events] == list(range(len(events)))
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    assert text == chat_answer.choices[0].message.content
    assert events[-1].response.output_text == text
    assert events[-1].response.usage.output_tokens == chat_answer.usage.completion_tokens


def test_unsupported_fields_are_refused(client):
    with pytest.raises(openai.BadRequestError, match="previous_response_id"):
        client.responses.create(model=MODEL, input="hi", previous_response_id="resp_123")
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.responses.create(model=MODEL, input="hi", tools=[{"type": "web_search"}])
    with pytest.raises(openai.BadRequestError, match="only messages"):
        client.responses.create(model=MODEL, input=[{"type": "function_call_output", "call_id": "c", "output": "x"}])
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="nope", input="hi")


@pytest.fixture(scope="module")
def reasoning_server():
    """SmolLM2 under the deepseek_r1 parser: it never writes </think>, so its whole answer is reasoning."""
    from tests.server_process import ServerProcess

    with ServerProcess(["smollm2-135m-instruct", "--served-model-name", MODEL, "--reasoning-parser", "deepseek_r1",
                        "--kv-cache-space", "0.25", "--max-model-len", "4096"]).running() as server:
        yield server


def test_reasoning_becomes_a_reasoning_item(reasoning_server):
    client = openai.OpenAI(base_url=reasoning_server.url("/v1"), api_key="none")
    messages = [{"role": "system", "content": INSTRUCTIONS}, {"role": "user", "content": QUESTION}]
    chat = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    reasoning = chat.choices[0].message.model_extra["reasoning_content"]
    assert reasoning and chat.choices[0].message.content is None

    response = client.responses.create(model=MODEL, instructions=INSTRUCTIONS, input=QUESTION, max_output_tokens=12,
                                       temperature=0)
    assert [item.type for item in response.output] == ["reasoning", "message"]
    assert response.output[0].content[0].text == reasoning
    assert response.output_text == ""

    events = list(client.responses.create(model=MODEL, instructions=INSTRUCTIONS, input=QUESTION,
                                          max_output_tokens=12, temperature=0, stream=True))
    streamed = "".join(event.delta for event in events if event.type == "response.reasoning_text.delta")
    assert streamed == reasoning
    done = [event for event in events if event.type == "response.output_item.done"]
    assert [(event.output_index, event.item.type) for event in done] == [(0, "reasoning"), (1, "message")]
    assert [event.sequence_number for event in events] == list(range(len(events)))
    assert [item.type for item in events[-1].response.output] == ["reasoning", "message"]
    reasoning_server.check_log()
