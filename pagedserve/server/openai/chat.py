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
from pagedserve.server.reasoning import ReasoningParser, grammar_after_reasoning, split_reasoning
from pagedserve.server.served_model import ServedModel
from pagedserve.server.state import RequestTracker, ServerState
from pagedserve.server.tool_parsers import ToolCallStream, ToolParser, parse_tool_calls
from pagedserve.server.tool_parsers.plan import ToolPlan, plan_tools
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
    tools: ToolPlan
    echo_text: str = ""
    created: int = field(default_factory=lambda: int(time.time()))


async def create_chat_completion(body: ChatCompletionRequest, request: Request, state: ServerState,
                                 model: ServedModel) -> Response:
    body.check_supported()
    state.check_request_template(body.chat_template, body.chat_template_kwargs)
    client = model.engine
    params = body.to_sampling_params(client.sampling_defaults,
                                     OutputKind.DELTA if body.stream else OutputKind.FINAL_ONLY)
    config = state.server_config
    tools = plan_tools(body.messages, body.tools, body.tool_choice, body.parallel_tool_calls,
                       body.chat_template or client.chat_template, config.tool_call_parser,
                       config.enable_auto_tool_choice, model.name, params.structured_outputs)
    params = params.replace(structured_outputs=tools.structured_outputs)
    template_kwargs = {**config.chat_template_kwargs, **(body.chat_template_kwargs or {})}
    prompt = await client.render_chat(tools.messages, ChatOptions(
        add_generation_prompt=body.add_generation_prompt, continue_final_message=body.continue_final_message,
        chat_template=body.chat_template, tools=tools.template_tools, chat_template_kwargs=template_kwargs,
        add_special_tokens=body.add_special_tokens))
    params = grammar_after_reasoning(params, config.reasoning_parser, prompt.text)
    chat = _Chat(random_id("chatcmpl"), body.model or model.name, body, prompt.text,
                 len(prompt.token_ids), config.response_role, config.reasoning_parser, tools,
                 _echo_text(body, config.response_role))
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
            reasoning = reasoning if chat.body.include_reasoning else None
        tool_calls: list[dict[str, Any]] = []
        if chat.tools.new_parser is not None and content is not None:
            content, calls = parse_tool_calls(chat.tools.new_parser(), content, chat.tools.max_calls)
            tool_calls = [call.to_openai() for call in calls]
        if chat.echo_text:
            content = chat.echo_text + (content or "")
        message = ChatMessage(role=chat.role, content=content, reasoning_content=reasoning, reasoning=reasoning,
                              tool_calls=tool_calls)
        choices.append(ChatChoice(index=completion.index, message=message,
                                  logprobs=_logprobs(chat, completion.logprobs),
                                  finish_reason=_finish_reason(completion.finish_reason, bool(tool_calls)),
                                  stop_reason=completion.stop_reason))
    usage = Usage.of(len(output.prompt_token_ids), sum(len(c.token_ids) for c in output.outputs),
                     output.num_cached_tokens)
    return ChatCompletionResponse(id=chat.request_id, created=chat.created, model=chat.model, choices=choices,
                                  usage=usage, prompt_logprobs=prompt_logprobs(output.prompt_logprobs))


def _finish_reason(finish_reason: str | None, has_tool_calls: bool) -> str | None:
    """"tool_calls" when the model ended its turn by calling tools, as OpenAI says."""
    return "tool_calls" if has_tool_calls and finish_reason == "stop" else finish_reason


def _logprobs(chat: _Chat, positions: list[PositionLogprobs] | None) -> dict[str, Any] | None:
    if not chat.body.logprobs or positions is None:
        return None
    return chat_logprobs(positions, chat.body.top_logprobs or 0)


@dataclass
class _Choice:
    """Streaming state of one of the n choices."""

    parser: ReasoningParser | None
    tools: ToolCallStream | None
    show_reasoning: bool = True
    num_tokens: int = 0
    pending_logprobs: list[PositionLogprobs] = field(default_factory=list)
    is_finished: bool = False


async def _stream_chat(chat: _Chat, stream: Any, state: ServerState,
                       tracker: RequestTracker) -> AsyncIterator[str]:
    num_choices = chat.body.n
    choices = [_Choice(ReasoningParser(chat.reasoning_parser, chat.prompt) if chat.reasoning_parser else None,
                       _tool_stream(chat.tools.new_parser, chat.tools.max_calls), chat.body.include_reasoning)
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
        tracker.fail(error)
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
    has_tool_calls = choice.tools is not None and choice.tools.has_calls
    return _chunk(chat, completion.index, delta or DeltaMessage(content=""), logprobs=logprobs,
                  finish_reason=_finish_reason(completion.finish_reason, has_tool_calls),
                  stop_reason=completion.stop_reason, usage=usage)


def _tool_stream(new_parser: Any, max_calls: int | None) -> ToolCallStream | None:
    parser: ToolParser | None = new_parser() if new_parser is not None else None
    return ToolCallStream(parser, max_calls) if parser is not None else None


def _delta(choice: _Choice, text: str, is_finished: bool) -> DeltaMessage | None:
    """The text as a delta (split into reasoning and content, then tool calls out of the content, with
    the parsers the request uses); None when empty."""
    reasoning, content = "", text
    if choice.parser is not None:
        piece = choice.parser.split(text, is_finished)
        reasoning, content = piece.reasoning if choice.show_reasoning else "", piece.content
    tool_calls: list[dict[str, Any]] = []
    if choice.tools is not None:
        tools = choice.tools.feed(content, is_finished)
        content, tool_calls = tools.content, tools.tool_calls
    if not reasoning and not content and not tool_calls:
        return None
    delta = DeltaMessage()
    if reasoning:
        delta = DeltaMessage(reasoning_content=reasoning, reasoning=reasoning)
    if content:
        delta.content = content
    if tool_calls:
        delta.tool_calls = tool_calls
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
