"""Where `pagedserve chat` gets its answers: the engine in this process, or a server over HTTP.

Both speak one verb, `stream(messages, options)`: an async iterator of `AnswerPiece`s whose last
piece carries the answer's `AnswerTimings`. Leaving the iteration early (Ctrl-C cancels it) aborts
the request: the engine frees its KV blocks, or the server sees the connection close and does.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, AsyncIterator

from pagedserve.config import EngineConfig


@dataclass(frozen=True)
class AnswerTimings:
    """One answer's durations (seconds) and token counts, as Ollama reports them with --verbose.

    load: from Enter until the model took the request up (templating, tokenizing, queueing; the
    model itself is loaded before the first prompt). prompt eval: until the first token. eval: from
    the first token to the last. Prompt tokens found in the prefix cache are not counted as
    evaluated, as Ollama does not count the ones it reuses.
    """

    total_seconds: float
    load_seconds: float
    num_prompt_tokens: int
    prompt_eval_seconds: float
    num_output_tokens: int
    eval_seconds: float


@dataclass(frozen=True)
class AnswerPiece:
    """What arrived since the last piece; the last piece of an answer carries only its timings."""

    text: str = ""
    reasoning: str = ""
    timings: AnswerTimings | None = None


class ChatError(Exception):
    """A failure to show the user as one line (no traceback): a refused request, an unreachable server."""


# What `/set` may change, by the name the request uses.
SAMPLING_OPTIONS = ("temperature", "top_p", "top_k", "min_p", "seed", "max_tokens", "repetition_penalty",
                    "presence_penalty", "frequency_penalty", "stop")


class EngineChat:
    """The model loaded in this process, through its EngineClient (the engine steps on its own thread)."""

    def __init__(self, engine_config: EngineConfig) -> None:
        """`engine_config.model` may name a created model: its SYSTEM and PARAMETERs then apply."""
        from pagedserve.engine.engine_client import EngineClient
        from pagedserve.store.models_dir import resolve_named_model

        self.model_name = engine_config.model
        config, model_defaults = resolve_named_model(engine_config)
        self.client = EngineClient.start(config, model_defaults)

    async def stream(self, messages: list[dict[str, str]], options: dict[str, Any]) -> AsyncIterator[AnswerPiece]:
        started = time.time()
        prompt = await self.client.render_chat(messages)
        stream = await self.client.generate(prompt.token_ids, self.sampling_params(options))
        output = None
        try:
            async for output in stream:
                if output.outputs[0].text:
                    yield AnswerPiece(text=output.outputs[0].text)
        finally:
            stream.abort()
        yield AnswerPiece(timings=_engine_timings(started, output, len(prompt.token_ids)))

    def sampling_params(self, options: dict[str, Any]) -> Any:
        """What `/set` changed over the model's defaults; no limit but the context unless max_tokens is set,
        as the chat API answers."""
        from pagedserve.sampling_params import OutputKind, SamplingParams

        values = self.client.sampling_defaults.resolve({name: options.get(name) for name in SAMPLING_OPTIONS},
                                                       fallbacks={"max_tokens": None})
        return SamplingParams(**values, output_kind=OutputKind.DELTA)

    async def close(self) -> None:
        self.client.shutdown()


def _engine_timings(started: float, output: Any, num_prompt_tokens: int) -> AnswerTimings:
    metrics = output.metrics
    scheduled = metrics.first_scheduled_time or started
    first_token = metrics.first_token_time or scheduled
    last_token = metrics.last_token_time or first_token
    return AnswerTimings(total_seconds=time.time() - started, load_seconds=scheduled - started,
                         num_prompt_tokens=num_prompt_tokens - output.num_cached_tokens,
                         prompt_eval_seconds=first_token - scheduled,
                         num_output_tokens=output.outputs[0].num_output_tokens, eval_seconds=last_token - first_token)


class ServerChat:
    """A running pagedserve (or any OpenAI-compatible) server's streaming chat API."""

    def __init__(self, url: str, api_key: str | None) -> None:
        import httpx

        base_url = url.rstrip("/").removesuffix("/v1")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.AsyncClient(base_url=base_url, headers=headers,
                                         timeout=httpx.Timeout(None, connect=10.0))
        self.model_name = ""

    async def connect(self, model: str | None) -> None:
        """Check the server answers; pick `model` among the ones it serves (default: its first)."""
        response = await self._request("GET", "/v1/models")
        names = [card["id"] for card in response.json().get("data", [])]
        if model is not None and model not in names:
            raise ChatError(f"the server does not serve {model!r}; it serves: {', '.join(names) or 'nothing'}")
        if not names:
            raise ChatError("the server serves no models")
        self.model_name = model or names[0]

    async def stream(self, messages: list[dict[str, str]], options: dict[str, Any]) -> AsyncIterator[AnswerPiece]:
        import httpx

        body = {"model": self.model_name, "messages": messages, "stream": True,
                "stream_options": {"include_usage": True}, **options}
        started = time.monotonic()
        usage: dict[str, Any] = {}
        first_token = last_token = None
        try:
            async with self._client.stream("POST", "/v1/chat/completions", json=body) as response:
                accepted = time.monotonic()
                if response.status_code != HTTPStatus.OK:
                    raise ChatError(_error_message(await response.aread(), response.status_code))
                async for event in _sse_events(response):
                    usage = event.get("usage") or usage
                    piece = _piece(event)
                    if piece.text or piece.reasoning:
                        last_token = time.monotonic()
                        first_token = first_token or last_token
                        yield piece
        except httpx.HTTPError as error:
            raise ChatError(f"the server at {self._client.base_url} failed: {error!r}") from None
        first_token = first_token or accepted
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        yield AnswerPiece(timings=AnswerTimings(
            total_seconds=time.monotonic() - started, load_seconds=accepted - started,
            num_prompt_tokens=usage.get("prompt_tokens", 0) - cached, prompt_eval_seconds=first_token - accepted,
            num_output_tokens=usage.get("completion_tokens", 0), eval_seconds=(last_token or first_token) - first_token))

    async def _request(self, method: str, path: str) -> Any:
        import httpx

        try:
            response = await self._client.request(method, path)
        except httpx.HTTPError as error:
            raise ChatError(f"cannot reach {self._client.base_url}: {error}") from None
        if response.status_code == HTTPStatus.UNAUTHORIZED:
            raise ChatError("the server wants an API key: give --api-key KEY (or set PAGEDSERVE_API_KEY)")
        if response.status_code != HTTPStatus.OK:
            raise ChatError(_error_message(response.content, response.status_code))
        return response

    async def close(self) -> None:
        await self._client.aclose()


def _piece(event: dict[str, Any]) -> AnswerPiece:
    """The first choice's delta of one chunk (the chat asks for one)."""
    choices = event.get("choices") or [{}]
    delta = choices[0].get("delta") or {}
    return AnswerPiece(text=delta.get("content") or "",
                       reasoning=delta.get("reasoning_content") or delta.get("reasoning") or "")


async def _sse_events(response: Any) -> AsyncIterator[dict[str, Any]]:
    """The JSON data of each server-sent event until `[DONE]`; an error event raises ChatError."""
    async for line in response.aiter_lines():
        if not line.startswith("data:"):
            continue
        data = line[len("data:"):].strip()
        if data == "[DONE]":
            return
        event = json.loads(data)
        if "error" in event:
            error = event["error"]
            raise ChatError(error.get("message", str(error)) if isinstance(error, dict) else str(error))
        yield event


def _error_message(body: bytes, status: int) -> str:
    try:
        error = json.loads(body)["error"]
        message = error["message"] if isinstance(error, dict) else str(error)
    except (ValueError, KeyError, TypeError):
        message = body.decode(errors="replace").strip() or HTTPStatus(status).phrase
    return f"{message} (HTTP {status})"
