"""POST /v1/chat/completions: render the messages, run one engine request, answer whole or streamed."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import Response

from pagedserve.engine.processor import ChatOptions
from pagedserve.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from pagedserve.sampling_params import OutputKind
from pagedserve.server.errors import sse_error
from pagedserve.server.openai.logprobs import chat_logprobs, prompt_logprobs
from pagedserve.server.openai.protocol import (ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
                                        ChatCompletionResponse, ChatMessage, DeltaMessage, Usage, random_id)
from pagedserve.server.reasoning import ReasoningParser, split_reasoning
from pagedserve.server.served_model import ServedModel
from pagedserve.server.state import RequestTracker, ServerState
from pagedserve.server.streaming import DONE, EventStreamResponse, collect_tracked, json_response, sse


@dataclass
class _Chat:
    """One chat request as the response builders need it."""

    request_id: str
    model: str
    body: ChatCompletionRequest
    prompt: str
    num_prompt_tokens: int
    role: str
    reasoning_parser: str | None
    echo_text: str = ""
    created: int = field(default_factory=lambda: int(time.time()))


async def create_chat_completion(body: ChatCompletionRequest, request: Request, state: ServerState,
                                 model: ServedModel) -> Response:
    body.check_supported()
    client = model.engine
    params = body.to_sampling_params(client.sampling_defaults,
                                     OutputKind.DELTA if body.stream else OutputKind.FINAL_ONLY)
    prompt = await client.render_chat(body.messages, ChatOptions(
        add_generation_prompt=body.add_generation_prompt, continue_final_message=body.continue_final_message,
        chat_template=body.chat_template, tools=body.tools, chat_template_kwargs=body.chat_template_kwargs,
        add_special_tokens=body.add_special_tokens))
    chat = _Chat(random_id("chatcmpl"), body.model or model.name, body, prompt.text,
                 len(prompt.token_ids), state.server_config.response_role, state.server_config.reasoning_parser,
                 _echo_text(body, state.server_config.response_role))
    state.log_received(chat.request_id, prompt.text, params)
    stream = await client.generate(prompt.token_ids, params, chat.request_id, lora_name=state.lora_name(body.model))
    tracker = state.track(model, [stream])
    if body.stream:
        return EventStreamResponse(_stream_chat(chat, stream, state, tracker), on_close=tracker.close)
    finals = await collect_tracked([stream], request, tracker)
    if finals is None:
        return Response(status_code=499)   # the client is gone; nobody reads this
    state.log_finished(chat.request_id, finals)
    return json_response(_chat_response(chat, finals[0]))


def _echo_text(body: ChatCompletionRequest, role: str) -> str:
    """With `echo`, the last message is repeated before the answer when it is the answering role's."""
    last = body.messages[-1]
    if body.echo and last.get("role") == role and isinstance(last.get("content"), str):
        return last["content"]
    return ""


def _chat_response(chat: _Chat, output: RequestOutput) -> ChatCompletionResponse:
    choices = []
    for completion in output.outputs:
        reasoning, content = None, completion.text
        if chat.reasoning_parser is not None:
            reasoning, content = split_reasoning(chat.reasoning_parser, completion.text, chat.prompt)
        if chat.echo_text:
            content = chat.echo_text + (content or "")
        message = ChatMessage(role=chat.role, content=content, reasoning_content=reasoning, reasoning=reasoning)
        choices.append(ChatChoice(index=completion.index, message=message,
                                  logprobs=_logprobs(chat, completion.logprobs),
                                  finish_reason=completion.finish_reason, stop_reason=completion.stop_reason))
    usage = Usage.of(len(output.prompt_token_ids), sum(len(c.token_ids) for c in output.outputs),
                     output.num_cached_tokens)
    return ChatCompletionResponse(id=chat.request_id, created=chat.created, model=chat.model, choices=choices,
                                  usage=usage, prompt_logprobs=prompt_logprobs(output.prompt_logprobs))


def _logprobs(chat: _Chat, positions: list[PositionLogprobs] | None) -> dict[str, Any] | None:
    if not chat.body.logprobs or positions is None:
        return None
    return chat_logprobs(positions, chat.body.top_logprobs or 0)


@dataclass
class _Choice:
    """Streaming state of one of the n choices."""

    parser: ReasoningParser | None
    num_tokens: int = 0
    pending_logprobs: list[PositionLogprobs] = field(default_factory=list)
    is_finished: bool = False


async def _stream_chat(chat: _Chat, stream: Any, state: ServerState,
                       tracker: RequestTracker) -> AsyncIterator[str]:
    num_choices = chat.body.n
    choices = [_Choice(ReasoningParser(chat.reasoning_parser, chat.prompt) if chat.reasoning_parser else None)
               for _ in range(num_choices)]
    try:
        for index in range(num_choices):
            yield sse(_chunk(chat, index, DeltaMessage(role=chat.role, content=""), usage=_usage(chat, 0)))
            if chat.echo_text:
                yield sse(_chunk(chat, index, DeltaMessage(content=chat.echo_text), usage=_usage(chat, 0)))
        num_cached_tokens = 0
        output = None
        async for output in stream:
            num_cached_tokens = output.num_cached_tokens
            for completion in output.outputs:
                chunk = _next_chunk(chat, choices[completion.index], completion)
                if chunk is not None:
                    yield sse(chunk)
        tracker.completed = True
        state.log_finished(chat.request_id, [output])
        if chat.body.include_usage:
            usage = Usage.of(chat.num_prompt_tokens, sum(choice.num_tokens for choice in choices), num_cached_tokens)
            yield sse(ChatCompletionChunk(id=chat.request_id, object="chat.completion.chunk", created=chat.created,
                                          model=chat.model, choices=[], usage=usage))
    except Exception as error:   # noqa: BLE001 - after the first byte, errors can only travel as events
        yield sse_error(error)
    yield DONE


def _next_chunk(chat: _Chat, choice: _Choice, completion: CompletionOutput) -> ChatCompletionChunk | None:
    if choice.is_finished:
        return None
    choice.num_tokens = completion.num_output_tokens
    if completion.logprobs:
        choice.pending_logprobs.extend(completion.logprobs)
    delta = _delta(choice, completion.text, completion.is_finished)
    if delta is None and not completion.is_finished:
        return None
    logprobs = _logprobs(chat, choice.pending_logprobs) if choice.pending_logprobs else None
    choice.pending_logprobs = []
    usage = _usage(chat, choice.num_tokens)
    if not completion.is_finished:
        return _chunk(chat, completion.index, delta, logprobs=logprobs, usage=usage)
    choice.is_finished = True
    return _chunk(chat, completion.index, delta or DeltaMessage(content=""), logprobs=logprobs,
                  finish_reason=completion.finish_reason, stop_reason=completion.stop_reason, usage=usage)


def _delta(choice: _Choice, text: str, is_finished: bool) -> DeltaMessage | None:
    """The text as a delta (split into reasoning and content with a parser); None when empty."""
    if choice.parser is None:
        return DeltaMessage(content=text) if text else None
    piece = choice.parser.split(text, is_finished)
    if not piece.reasoning and not piece.content:
        return None
    delta = DeltaMessage()
    if piece.reasoning:
        delta = DeltaMessage(reasoning_content=piece.reasoning, reasoning=piece.reasoning)
    if piece.content:
        delta.content = piece.content
    return delta


def _chunk(chat: _Chat, index: int, delta: DeltaMessage, logprobs: dict[str, Any] | None = None,
           finish_reason: str | None = None, stop_reason: int | str | None = None,
           usage: Usage | None = None) -> ChatCompletionChunk:
    choice = ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=finish_reason)
    if finish_reason is not None:
        choice.stop_reason = stop_reason
    chunk = ChatCompletionChunk(id=chat.request_id, object="chat.completion.chunk", created=chat.created,
                                model=chat.model, choices=[choice])
    if usage is not None:
        chunk.usage = usage
    return chunk


def _usage(chat: _Chat, num_completion_tokens: int) -> Usage | None:
    """Per-chunk usage (this choice's tokens so far), only with `stream_options.continuous_usage_stats`."""
    if not chat.body.continuous_usage:
        return None
    return Usage.of(chat.num_prompt_tokens, num_completion_tokens)
