"""The Ollama API on the same port as the OpenAI one: /api/version (open), /api/chat and /api/generate,
the model routes of ollama/models.py (/api/tags, /api/show, /api/ps) and ollama/manage.py (/api/pull,
/api/create, /api/copy, /api/delete), the embedding routes of ollama/embed.py, all behind the API
key when one is set.

Requests run the same engine path as the OpenAI routes (a held ServedModel, AsyncEngine.add_request,
a tracker that aborts on disconnect). Streams are NDJSON, one object per line, the last with
`done: true` and the counts and durations. Errors are Ollama's `{"error": "..."}` (see server/errors.py).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import APIRouter, Depends, Request
from starlette.responses import JSONResponse, Response

from pagedserve.engine.processor import ChatOptions, ChatPrompt
from pagedserve.loader.chat_template import NoChatTemplateError
from pagedserve.store.go_template import is_go_template, translate_go_template
from pagedserve.outputs import RequestOutput
from pagedserve.sampling_params import SamplingParams
from pagedserve.server.errors import APIError, from_exception
from pagedserve.server.ollama.models import find_model
from pagedserve.server.ollama.embed import router as embed_router
from pagedserve.server.ollama.manage import router as manage_router
from pagedserve.server.ollama.models import router as models_router
from pagedserve.server.ollama.protocol import (ChatBody, GenerateBody, InferenceBody, done_fields, ollama_tool_call,
                                               sampling_params, think_options, timestamp)
from pagedserve.server.api import read_body, server_state, verify_api_key
from pagedserve.server.openai.protocol import random_id
from pagedserve.server.reasoning import ReasoningParser, grammar_after_reasoning
from pagedserve.server.served_model import ServedModel
from pagedserve.server.state import RequestTracker, ServerState
from pagedserve.server.streaming import NDJSONResponse, collect_tracked
from pagedserve.server.tool_parsers import ToolCallStream
from pagedserve.server.tool_parsers.plan import GENERIC_PARSER, plan_tools

# NOTE: the Ollama release whose API this follows; tools compare it before using newer features.
OLLAMA_API_VERSION = "0.6.0"

open_router = APIRouter()
router = APIRouter(dependencies=[Depends(verify_api_key)])
router.include_router(models_router)
router.include_router(manage_router)
router.include_router(embed_router)


@open_router.api_route("/api/version", methods=["GET", "HEAD"])
async def version() -> JSONResponse:
    return JSONResponse({"version": OLLAMA_API_VERSION})


@router.post("/api/chat")
async def chat(request: Request) -> Response:
    start = time.perf_counter()
    state = server_state(request)
    body = await read_body(request, ChatBody)
    model = find_model(state, body)
    body.check_supported()
    keep_alive = body.keep_alive_seconds()
    if not body.messages:
        return await _load_or_unload(state, model, body, keep_alive, start)

    async def answer_chat(waited: float) -> Response:
        client = model.engine
        params, num_ctx = sampling_params(body.options, client.sampling_defaults, body.stream,
                                          state.server_config.default_max_tokens or None)
        # Ollama reads tool calls out of every answer to a request with tools: tool_choice auto, always on.
        tools = plan_tools(body.messages, body.tools, None, None, client.chat_template,
                           state.server_config.tool_call_parser or GENERIC_PARSER, True, model.name,
                           body.structured_outputs())
        params = params.replace(structured_outputs=tools.structured_outputs)
        thinking = think_options(body.think, state.server_config.reasoning_parser, client.chat_template,
                                 body.model or body.name)
        template_kwargs = {**state.server_config.chat_template_kwargs, **(thinking.template_kwargs or {})}
        prompt = await client.render_chat(tools.messages, ChatOptions(tools=tools.template_tools,
                                                                      chat_template_kwargs=template_kwargs))
        params = grammar_after_reasoning(params, thinking.reasoning_parser, prompt.text)
        run = _Run(random_id("chat"), body.model or body.name, start, waited, True,
                   _parser(thinking.reasoning_parser, prompt.text), show_thinking=thinking.show,
                   tools=ToolCallStream(tools.new_parser()) if tools.new_parser is not None else None)
        return await _answer(state, request, model, run, prompt, params, num_ctx, body.stream)

    return await state.respond(model, answer_chat, keep_alive)


@router.post("/api/generate")
async def generate(request: Request) -> Response:
    start = time.perf_counter()
    state = server_state(request)
    body = await read_body(request, GenerateBody)
    model = find_model(state, body)
    body.check_supported()
    if body.suffix:
        raise APIError(f'"{body.model}" does not support insert')
    keep_alive = body.keep_alive_seconds()
    if not body.prompt:
        return await _load_or_unload(state, model, body, keep_alive, start)

    async def answer_generate(waited: float) -> Response:
        params, num_ctx = sampling_params(body.options, model.engine.sampling_defaults, body.stream,
                                          state.server_config.default_max_tokens or None)
        params = params.replace(structured_outputs=body.structured_outputs())
        thinking = think_options(body.think, state.server_config.reasoning_parser, model.engine.chat_template,
                                 body.model or body.name)
        prompt = await _generate_prompt(body, state, model, {**state.server_config.chat_template_kwargs,
                                                             **(thinking.template_kwargs or {})})
        if not body.raw:
            params = grammar_after_reasoning(params, thinking.reasoning_parser, prompt.text)
        run = _Run(random_id("generate"), body.model or body.name, start, waited, False,
                   None if body.raw else _parser(thinking.reasoning_parser, prompt.text), with_context=not body.raw,
                   show_thinking=thinking.show)
        return await _answer(state, request, model, run, prompt, params, num_ctx, body.stream)

    return await state.respond(model, answer_generate, keep_alive)


# ---- answering --------------------------------------------------------------------------------------

@dataclass
class _Run:
    """One chat or generate request as the response builders need it."""

    request_id: str
    model: str                        # as the request named it
    start: float                      # perf_counter() when the request arrived
    load_seconds: float
    is_chat: bool
    parser: ReasoningParser | None
    with_context: bool = False        # generate's `context`: the prompt and answer tokens
    show_thinking: bool = True        # false with think: false (the thinking, if any, is not sent)
    tools: ToolCallStream | None = None
    prompt_token_ids: list[int] = field(default_factory=list)
    output_token_ids: list[int] = field(default_factory=list)
    num_sent_calls: int = 0

    def chunk(self, content: str, thinking: str | None = None) -> dict[str, Any]:
        chunk: dict[str, Any] = {"model": self.model, "created_at": timestamp()}
        thinking = thinking if self.show_thinking else None
        if self.is_chat:
            chunk["message"] = {"role": "assistant", "content": content}
            if thinking:
                chunk["message"]["thinking"] = thinking
            calls = self.tools.calls[self.num_sent_calls:] if self.tools is not None else []
            if calls:
                chunk["message"]["tool_calls"] = [ollama_tool_call(call, self.num_sent_calls + index)
                                                  for index, call in enumerate(calls)]
                self.num_sent_calls += len(calls)
        else:
            chunk["response"] = content
            if thinking:
                chunk["thinking"] = thinking
        chunk["done"] = False
        return chunk

    def last(self, output: RequestOutput, content: str = "", thinking: str | None = None) -> dict[str, Any]:
        last = {**self.chunk(content, thinking),
                **done_fields(output, time.perf_counter() - self.start, self.load_seconds)}
        if self.with_context:
            last["context"] = self.prompt_token_ids + self.output_token_ids
        return last


async def _answer(state: ServerState, request: Request, model: ServedModel, run: _Run, prompt: ChatPrompt,
                  params: SamplingParams, num_ctx: int | None, stream: bool) -> Response:
    params = _fit_context(params, len(prompt.token_ids), model, num_ctx)
    run.prompt_token_ids = prompt.token_ids
    state.log_received(run.request_id, prompt.text, params)
    engine_stream = await model.engine.generate(prompt.token_ids, params, run.request_id,
                                                lora_name=state.lora_name(run.model))   # a LoRA adapter's name
    tracker = state.track(model, [engine_stream])
    if stream:
        return NDJSONResponse(_stream(run, engine_stream, state, tracker), on_close=tracker.close)
    finals = await collect_tracked([engine_stream], request, tracker)
    if finals is None:
        return Response(status_code=499)   # the client is gone; nobody reads this
    state.log_finished(run.request_id, finals)
    completion = finals[0].outputs[0]
    run.output_token_ids = list(completion.token_ids)
    thinking, content = _split(run, completion.text, is_finished=True)
    return JSONResponse(run.last(finals[0], content, thinking))


async def _stream(run: _Run, engine_stream: Any, state: ServerState, tracker: RequestTracker) -> AsyncIterator[str]:
    try:
        output = None
        async for output in engine_stream:
            completion = output.outputs[0]
            run.output_token_ids.extend(completion.token_ids)
            num_calls = run.num_sent_calls
            thinking, content = _split(run, completion.text, completion.is_finished)
            has_new_calls = run.tools is not None and len(run.tools.calls) > num_calls
            if content or (thinking and run.show_thinking) or has_new_calls:
                yield _line(run.chunk(content, thinking))
        tracker.completed = True
        state.log_finished(run.request_id, [output])
        yield _line(run.last(output))
    except Exception as error:   # noqa: BLE001 - after the first line, errors can only travel as lines
        tracker.fail(error)
        yield _line({"error": from_exception(error).message})


def _split(run: _Run, text: str, is_finished: bool) -> tuple[str, str]:
    """(thinking, content) of a streamed piece, with tool calls taken out of the content (into run.tools)."""
    thinking, content = "", text
    if run.parser is not None:
        piece = run.parser.split(text, is_finished)
        thinking, content = piece.reasoning, piece.content
    if run.tools is not None:
        content = run.tools.feed(content, is_finished).content
    return thinking, content


def _fit_context(params: SamplingParams, num_prompt_tokens: int, model: ServedModel,
                 num_ctx: int | None) -> SamplingParams:
    """Cap the answer at the context (num_ctx when the request gives one, at most the server's), as
    Ollama stops at the context rather than refusing a long num_predict."""
    limit = model.max_model_len if num_ctx is None else min(num_ctx, model.max_model_len)
    room = limit - num_prompt_tokens
    if room < 1:
        raise APIError(f"the prompt has {num_prompt_tokens} tokens, which leaves no room for an answer in the "
                       f"context of {limit} tokens (num_ctx, at most the server's max_model_len)")
    return params.replace(max_tokens=room if params.max_tokens is None else min(params.max_tokens, room))


async def _generate_prompt(body: GenerateBody, state: ServerState, model: ServedModel,
                           template_kwargs: dict[str, Any] | None = None) -> ChatPrompt:
    """Raw: the prompt as is. Otherwise the prompt as a user message through the chat template (the
    request's `template` if it gives one), after the system prompt and the model's opening messages.

    A Go template (Ollama's kind: no arithmetic, loops only over the request's data) is always taken;
    a Jinja one only with --trust-request-chat-template."""
    client = model.engine
    if body.raw:
        return ChatPrompt(body.prompt, await client.tokenize(body.prompt, add_special_tokens=True))
    model_defaults = client.model_defaults
    system = body.system or model_defaults.system
    messages = [{"role": "system", "content": system}] if system else []
    if body.context is None:
        messages += [{"role": role, "content": content} for role, content in model_defaults.messages]
    messages.append({"role": "user", "content": body.prompt})
    template = None
    if body.template:
        if not is_go_template(body.template):
            state.check_request_template(body.template, None)
        template = translate_go_template(body.template) if is_go_template(body.template) else body.template
    try:
        prompt = await client.render_chat(messages, ChatOptions(chat_template=template, with_model_defaults=False,
                                                                chat_template_kwargs=template_kwargs))
    except NoChatTemplateError:   # a base model: Ollama's default template is the bare prompt
        prompt = ChatPrompt(body.prompt, await client.tokenize(body.prompt, add_special_tokens=True))
    if body.context:
        client.check_token_ids(body.context, "context")
        prompt = ChatPrompt(prompt.text, list(body.context) + prompt.token_ids)
    return prompt


async def _load_or_unload(state: ServerState, model: ServedModel, body: InferenceBody, keep_alive: float | None,
                          start: float) -> Response:
    """An empty prompt or no messages: load the model (done_reason "load"), or with keep_alive 0 unload it."""
    reply: dict[str, Any] = {"model": body.model or body.name, "created_at": timestamp()}
    if isinstance(body, ChatBody):
        reply["message"] = {"role": "assistant", "content": ""}
    else:
        reply["response"] = ""
    if keep_alive == 0:
        await model.unload_when_idle()
        return JSONResponse({**reply, "done": True, "done_reason": "unload"})

    async def loaded(waited: float) -> Response:
        return JSONResponse({**reply, "done": True, "done_reason": "load",
                             "total_duration": int((time.perf_counter() - start) * 1e9),
                             "load_duration": int(waited * 1e9)})

    return await state.respond(model, loaded, keep_alive)


def _parser(name: str | None, prompt: str) -> ReasoningParser | None:
    return ReasoningParser(name, prompt) if name else None


def _line(payload: dict[str, Any]) -> str:
    return json.dumps(payload, ensure_ascii=False) + "\n"
