"""POST /v1/responses: OpenAI's Responses API for text, stateless (nothing is stored).

`input` (a string, or message items whose content is text) and `instructions` become chat messages
rendered by the model's template; the answer is one `message` output item with one `output_text` part,
after a `reasoning` item when the server runs a reasoning parser and the model reasoned, whole or as
OpenAI's stream of typed events (response.created ... response.reasoning_text.delta ...
response.output_text.delta ... response.completed), each with its sequence_number.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from pydantic import Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pagedserve.engine.processor import ChatOptions
from pagedserve.outputs import RequestOutput
from pagedserve.sampling_params import OutputKind
from pagedserve.server.errors import APIError, from_exception
from pagedserve.server.openai.protocol import ChatCompletionRequest, OpenAIModel, random_id
from pagedserve.server.reasoning import ReasoningParser, split_reasoning
from pagedserve.server.served_model import ServedModel
from pagedserve.server.state import RequestTracker, ServerState
from pagedserve.server.streaming import EventStreamResponse, collect_tracked

_TEXT_PARTS = ("input_text", "output_text", "text")


class ResponsesRequest(OpenAIModel):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = None
    top_p: float | None = None
    stream: bool = False
    tools: list[dict[str, Any]] | None = None
    previous_response_id: str | None = None
    text: dict[str, Any] | None = None
    metadata: dict[str, Any] | None = None
    user: str | None = None

    def messages(self) -> list[dict[str, Any]]:
        """The chat messages: instructions as the system message, then the input items."""
        if self.previous_response_id is not None:
            raise APIError("previous_response_id is not supported: this server stores no responses; send the "
                           "whole conversation as input", param="previous_response_id")
        if self.tools:
            raise APIError("tools are not supported by /v1/responses yet", param="tools")
        text_format = (self.text or {}).get("format") or {"type": "text"}
        if text_format.get("type") != "text":
            raise APIError("only text output is supported (text.format.type 'text')", param="text")
        messages = [{"role": "system", "content": self.instructions}] if self.instructions else []
        if isinstance(self.input, str):
            return messages + [{"role": "user", "content": self.input}]
        for item in self.input:
            messages.append(_message(item))
        if not messages:
            raise APIError("'input' must not be empty", param="input")
        return messages


def _message(item: dict[str, Any]) -> dict[str, Any]:
    kind, role, content = item.get("type", "message"), item.get("role"), item.get("content")
    if kind != "message" or role not in ("user", "assistant", "system", "developer"):
        raise APIError(f"input items of type {kind!r} (role {role!r}) are not supported; only messages with text "
                       "content", param="input")
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS:
                raise APIError(f"content parts of type {part.get('type') if isinstance(part, dict) else part!r} "
                               "are not supported; only text", param="input")
            parts.append(str(part.get("text", "")))
        content = "".join(parts)
    if not isinstance(content, str):
        raise APIError("each input message needs text content", param="input")
    return {"role": "system" if role == "developer" else role, "content": content}


@dataclass
class _Run:
    body: ResponsesRequest
    model: str
    num_prompt_tokens: int
    prompt: str
    reasoning_parser: str | None
    response_id: str = field(default_factory=lambda: random_id("resp"))
    created_at: int = field(default_factory=lambda: int(time.time()))
    sequence_number: int = 0

    def response(self, status: str, output: list[dict[str, Any]], final: RequestOutput | None = None) -> dict[str, Any]:
        body = self.body
        incomplete = None
        usage = None
        if final is not None:
            completion = final.outputs[0]
            if completion.finish_reason == "length":
                status, incomplete = "incomplete", {"reason": "max_output_tokens"}
            num_output = completion.num_output_tokens   # also right in DELTA mode
            usage = {"input_tokens": self.num_prompt_tokens,
                     "input_tokens_details": {"cached_tokens": final.num_cached_tokens},
                     "output_tokens": num_output, "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": self.num_prompt_tokens + num_output}
        return {"id": self.response_id, "object": "response", "created_at": self.created_at, "status": status,
                "error": None, "incomplete_details": incomplete, "instructions": body.instructions,
                "max_output_tokens": body.max_output_tokens, "model": self.model, "output": output,
                "parallel_tool_calls": False, "previous_response_id": None, "store": False,
                "temperature": body.temperature, "text": {"format": {"type": "text"}}, "tool_choice": "none",
                "tools": [], "top_p": body.top_p, "truncation": "disabled", "usage": usage, "user": body.user,
                "metadata": body.metadata or {}}

    def output(self, text: str) -> list[dict[str, Any]]:
        """The output items of a whole answer: its reasoning (if any), then the message."""
        reasoning, content = (split_reasoning(self.reasoning_parser, text, self.prompt) if self.reasoning_parser
                              else (None, text))
        items = [_item("reasoning", random_id("rs"), reasoning, "completed")] if reasoning is not None else []
        return items + [_item("message", random_id("msg"), content or "", "completed")]

    def event(self, kind: str, **fields: Any) -> str:
        payload = {"type": kind, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return f"event: {kind}\ndata: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _item(kind: str, item_id: str, text: str | None, status: str) -> dict[str, Any]:
    """An output item: a reasoning item (its text as reasoning_text content) or the assistant message."""
    if kind == "reasoning":
        content = [] if text is None else [{"type": "reasoning_text", "text": text}]
        return {"type": "reasoning", "id": item_id, "summary": [], "content": content, "status": status}
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [] if text is None else [_text_part(text)]}


class _StreamedItems:
    """The output items as they stream: the open one gets deltas; a change of side (reasoning to answer)
    closes it and opens the next, each with OpenAI's added / delta / done events."""

    def __init__(self, run: _Run) -> None:
        self.run = run
        self.done: list[dict[str, Any]] = []
        self.kind: str | None = None
        self.item_id = ""
        self.text = ""

    def add(self, kind: str, delta: str) -> list[str]:
        if not delta:
            return []
        events = self.close() + self._open(kind) if kind != self.kind else []
        self.text += delta
        name = "response.reasoning_text.delta" if kind == "reasoning" else "response.output_text.delta"
        extra = {} if kind == "reasoning" else {"logprobs": []}
        return events + [self.run.event(name, delta=delta, **self._where(), **extra)]

    def finish(self) -> list[str]:
        """Close the open item; an answer that was all reasoning still gets its (empty) message."""
        events = self.close()
        if not self.done or self.done[-1]["type"] != "message":
            events += self._open("message") + self.close()
        return events

    def close(self) -> list[str]:
        if self.kind is None:
            return []
        run, where, text = self.run, self._where(), self.text
        if self.kind == "reasoning":
            events = [run.event("response.reasoning_text.done", text=text, **where)]
        else:
            events = [run.event("response.output_text.done", text=text, logprobs=[], **where),
                      run.event("response.content_part.done", part=_text_part(text), **where)]
        item = _item(self.kind, self.item_id, text, "completed")
        events.append(run.event("response.output_item.done", output_index=len(self.done), item=item))
        self.done.append(item)
        self.kind, self.text = None, ""
        return events

    def _open(self, kind: str) -> list[str]:
        self.kind, self.item_id, self.text = kind, random_id("rs" if kind == "reasoning" else "msg"), ""
        events = [self.run.event("response.output_item.added", output_index=len(self.done),
                                 item=_item(kind, self.item_id, None, "in_progress"))]
        if kind == "message":
            events.append(self.run.event("response.content_part.added", part=_text_part(""), **self._where()))
        return events

    def _where(self) -> dict[str, Any]:
        return {"item_id": self.item_id, "output_index": len(self.done), "content_index": 0}


async def create_response(body: ResponsesRequest, request: Request, state: ServerState, model: ServedModel) -> Response:
    messages = body.messages()
    client = model.engine
    chat = ChatCompletionRequest(model=body.model, messages=messages, max_tokens=body.max_output_tokens,
                                 temperature=body.temperature, top_p=body.top_p, stream=body.stream)
    params = chat.to_sampling_params(client.sampling_defaults, OutputKind.DELTA if body.stream else OutputKind.FINAL_ONLY)
    prompt = await client.render_chat(messages, ChatOptions())
    run = _Run(body, body.model or model.name, len(prompt.token_ids), prompt.text, state.server_config.reasoning_parser)
    state.log_received(run.response_id, prompt.text, params)
    stream = await client.generate(prompt.token_ids, params, run.response_id, lora_name=state.lora_name(body.model))
    tracker = state.track(model, [stream])
    if body.stream:
        return EventStreamResponse(_stream(run, stream, state, tracker), on_close=tracker.close)
    finals = await collect_tracked([stream], request, tracker)
    if finals is None:
        return Response(status_code=499)   # the client is gone; nobody reads this
    state.log_finished(run.response_id, finals)
    final = finals[0]
    return JSONResponse(run.response("completed", run.output(final.outputs[0].text), final))


async def _stream(run: _Run, stream: Any, state: ServerState, tracker: RequestTracker) -> AsyncIterator[str]:
    parser = ReasoningParser(run.reasoning_parser, run.prompt) if run.reasoning_parser else None
    items = _StreamedItems(run)
    try:
        yield run.event("response.created", response=run.response("in_progress", []))
        yield run.event("response.in_progress", response=run.response("in_progress", []))
        final = None
        async for final in stream:
            completion = final.outputs[0]
            if parser is None:
                events = items.add("message", completion.text)
            else:
                piece = parser.split(completion.text, completion.is_finished)
                events = items.add("reasoning", piece.reasoning) + items.add("message", piece.content)
            for event in events:
                yield event
        tracker.completed = True
        state.log_finished(run.response_id, [final])
        for event in items.finish():
            yield event
        response = run.response("completed", items.done, final)
        kind = "response.completed" if response["status"] == "completed" else "response.incomplete"
        yield run.event(kind, response=response)
    except Exception as error:   # noqa: BLE001 - once streaming, an error can only travel as an event
        api_error = from_exception(error)
        yield run.event("error", code=str(api_error.status), message=api_error.message, param=api_error.param)
