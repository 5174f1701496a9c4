"""POST /v1/completions: one engine request per prompt, choices numbered prompt_index * n + i."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, AsyncIterator

from starlette.requests import Request
from starlette.responses import Response

from pagedserve.outputs import CompletionOutput, PositionLogprobs, RequestOutput
from pagedserve.sampling_params import OutputKind
from pagedserve.server.errors import sse_error
from pagedserve.server.openai.logprobs import completion_logprobs, prompt_logprobs
from pagedserve.server.openai.protocol import (CompletionChoice, CompletionChunk, CompletionRequest, CompletionResponse,
                                        Usage, random_id)
from pagedserve.server.served_model import ServedModel
from pagedserve.server.state import RequestTracker, ServerState
from pagedserve.server.streaming import DONE, EventStreamResponse, collect_tracked, json_response, merge_streams, sse

if TYPE_CHECKING:
    from pagedserve.engine.engine_client import EngineClient


@dataclass
class _Completions:
    request_id: str
    model: str
    body: CompletionRequest
    client: EngineClient
    echo_texts: list[str]
    created: int = field(default_factory=lambda: int(time.time()))

    def decode_one(self, token_id: int) -> str:
        return self.client.decode_one(token_id)

    def logprobs(self, token_ids: list[int], positions: list[PositionLogprobs | None] | None,
                 text_offset: int) -> dict[str, Any] | None:
        if self.body.logprobs is None or positions is None:
            return None
        return completion_logprobs(token_ids, positions, self.body.logprobs, self.decode_one, text_offset)


async def create_completion(body: CompletionRequest, request: Request, state: ServerState,
                            model: ServedModel) -> Response:
    body.check_supported()
    prompts = body.prompts()
    client = model.engine
    params = body.to_sampling_params(client.sampling_defaults,
                                     OutputKind.DELTA if body.stream else OutputKind.FINAL_ONLY)
    echo_texts = [(p if isinstance(p, str) else await client.decode(p)) if body.echo else "" for p in prompts]
    run = _Completions(random_id("cmpl"), body.model or model.name, body, client, echo_texts)
    streams = []
    try:
        for index, prompt in enumerate(prompts):
            request_id = f"{run.request_id}-{index}"
            state.log_received(request_id, prompt, params)
            streams.append(await client.generate(prompt, params, request_id, add_special_tokens=body.add_special_tokens,
                                                 lora_name=state.lora_name(body.model)))
    except BaseException:
        for stream in streams:
            stream.abort()
        raise
    tracker = state.track(model, streams)
    if body.stream:
        return EventStreamResponse(_stream_completions(run, streams, state, tracker), on_close=tracker.close)
    finals = await collect_tracked(streams, request, tracker)
    if finals is None:
        return Response(status_code=499)   # the client is gone; nobody reads this
    state.log_finished(run.request_id, finals)
    return json_response(_completion_response(run, finals))


def _completion_response(run: _Completions, finals: list[RequestOutput]) -> CompletionResponse:
    choices = []
    for prompt_index, output in enumerate(finals):
        for completion in output.outputs:
            choices.append(_choice(run, prompt_index, output, completion))
    usage = Usage.of(sum(len(o.prompt_token_ids) for o in finals),
                     sum(len(c.token_ids) for o in finals for c in o.outputs),
                     sum(o.num_cached_tokens for o in finals))
    return CompletionResponse(id=run.request_id, created=run.created, model=run.model, choices=choices, usage=usage)


def _choice(run: _Completions, prompt_index: int, output: RequestOutput,
            completion: CompletionOutput) -> CompletionChoice:
    echo_text = run.echo_texts[prompt_index]
    token_ids, positions = completion.token_ids, completion.logprobs
    if echo_text and positions is not None and output.prompt_logprobs is not None:
        token_ids = output.prompt_token_ids + token_ids
        positions = output.prompt_logprobs + positions
    return CompletionChoice(
        index=prompt_index * run.body.n + completion.index, text=echo_text + completion.text,
        logprobs=run.logprobs(token_ids, positions, 0), finish_reason=completion.finish_reason,
        stop_reason=completion.stop_reason,
        prompt_logprobs=prompt_logprobs(output.prompt_logprobs) if run.body.prompt_logprobs is not None else None)


@dataclass
class _Choice:
    """Streaming state of one choice."""

    num_tokens: int = 0
    text_offset: int = 0
    pending_ids: list[int] = field(default_factory=list)
    pending_logprobs: list[PositionLogprobs] = field(default_factory=list)
    is_finished: bool = False


async def _stream_completions(run: _Completions, streams: list[Any], state: ServerState,
                              tracker: RequestTracker) -> AsyncIterator[str]:
    num_choices = run.body.n
    choices = [_Choice() for _ in range(len(streams) * num_choices)]
    finals: list[RequestOutput | None] = [None] * len(streams)
    merged = merge_streams(streams)
    try:
        async for prompt_index, output in merged:
            if finals[prompt_index] is None and run.echo_texts[prompt_index]:
                for index in range(num_choices):
                    yield sse(_echo_chunk(run, prompt_index, index, output, choices[prompt_index * num_choices + index]))
            finals[prompt_index] = output
            for completion in output.outputs:
                choice = choices[prompt_index * num_choices + completion.index]
                chunk = _next_chunk(run, prompt_index, output, completion, choice)
                if chunk is not None:
                    yield sse(chunk)
        tracker.completed = True
        state.log_finished(run.request_id, finals)
        if run.body.include_usage:
            done = [final for final in finals if final is not None]
            usage = Usage.of(sum(len(o.prompt_token_ids) for o in done), sum(c.num_tokens for c in choices),
                             sum(o.num_cached_tokens for o in done))
            yield sse(CompletionChunk(id=run.request_id, object="text_completion", created=run.created,
                                      model=run.model, choices=[], usage=usage))
    except Exception as error:   # noqa: BLE001 - after the first byte, errors can only travel as events
        tracker.fail(error)
        yield sse_error(error)
    finally:
        await merged.aclose()
    yield DONE


def _echo_chunk(run: _Completions, prompt_index: int, index: int, output: RequestOutput,
                choice: _Choice) -> CompletionChunk:
    text = run.echo_texts[prompt_index]
    logprobs = None
    if output.prompt_logprobs is not None:
        logprobs = run.logprobs(output.prompt_token_ids, output.prompt_logprobs, 0)
    choice.text_offset = len(text)
    return _chunk(run, prompt_index * run.body.n + index, text, logprobs, output)


def _next_chunk(run: _Completions, prompt_index: int, output: RequestOutput, completion: CompletionOutput,
                choice: _Choice) -> CompletionChunk | None:
    if choice.is_finished:
        return None
    choice.num_tokens = completion.num_output_tokens
    if completion.logprobs:
        choice.pending_ids.extend(completion.token_ids)
        choice.pending_logprobs.extend(completion.logprobs)
    if not completion.text and not completion.is_finished:
        return None
    logprobs = run.logprobs(choice.pending_ids, choice.pending_logprobs, choice.text_offset)
    choice.text_offset += len(completion.text)
    choice.pending_ids, choice.pending_logprobs = [], []
    chunk = _chunk(run, prompt_index * run.body.n + completion.index, completion.text, logprobs, output,
                   choice.num_tokens)
    if completion.is_finished:
        choice.is_finished = True
        chunk.choices[0].finish_reason = completion.finish_reason
        chunk.choices[0].stop_reason = completion.stop_reason
    return chunk


def _chunk(run: _Completions, index: int, text: str, logprobs: dict[str, Any] | None, output: RequestOutput,
           num_tokens: int = 0) -> CompletionChunk:
    choice = CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=None)
    chunk = CompletionChunk(id=run.request_id, object="text_completion", created=run.created, model=run.model,
                            choices=[choice])
    if run.body.continuous_usage:
        chunk.usage = Usage.of(len(output.prompt_token_ids), num_tokens)
    return chunk
