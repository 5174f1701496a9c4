"""`pagedserve bench serve`: load-test any OpenAI-compatible server (ours, vLLM, llama-server).

Each request streams from /v1/completions or /v1/chat/completions; TTFT is the time to the first
chunk with tokens, ITL the gaps between later chunks, TPOT (E2E - TTFT) / (output tokens - 1), E2E
the whole request. Output and prompt token counts come from the server's usage report when it sends
one. With a JSON schema, a chosen share of the requests carries it (vLLM's
benchmark_serving_structured_output.py): `response_format` json_schema on chat, vLLM's
`structured_outputs` on completions.
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from tqdm.auto import tqdm

from pagedserve.bench.datasets import BenchPrompt

CHAT_ENDPOINT = "/v1/chat/completions"


@dataclass(frozen=True)
class LoadConfig:
    """What every request of one run shares, and how they are sent."""

    base_url: str
    model: str
    endpoint: str = "/v1/completions"
    max_concurrency: int = 1
    request_rate: float = float("inf")    # requests per second, Poisson arrivals; inf: all at once
    ignore_eos: bool = False
    api_key: str | None = None
    seed: int = 0
    json_schema: dict[str, Any] | None = None
    structured_output_ratio: float = 1.0   # the share of requests that carry `json_schema`

    def __post_init__(self) -> None:
        if not self.endpoint.startswith("/"):
            raise ValueError(f"endpoint must be a path such as /v1/completions, got {self.endpoint!r}")
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be at least 1, got {self.max_concurrency}")
        if not 0.0 <= self.structured_output_ratio <= 1.0:
            raise ValueError(f"structured_output_ratio must be in [0, 1], got {self.structured_output_ratio}")

    @property
    def is_chat(self) -> bool:
        return self.endpoint.rstrip("/").endswith("/chat/completions")

    @property
    def url(self) -> str:
        return self.base_url.rstrip("/") + self.endpoint

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def structured_indices(self, num_prompts: int) -> set[int]:
        """Which requests carry the schema: `structured_output_ratio` of them, chosen by the seed."""
        if self.json_schema is None:
            return set()
        return set(random.Random(self.seed).sample(range(num_prompts), round(num_prompts * self.structured_output_ratio)))


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    error: str = ""
    is_structured: bool = False
    finish_reason: str | None = None
    text: str = ""


def request_body(config: LoadConfig, prompt: BenchPrompt, is_structured: bool) -> dict[str, Any]:
    """The JSON one request sends: greedy, streamed with usage, `output_len` tokens at most."""
    body: dict[str, Any] = {"model": config.model, "max_tokens": prompt.output_len, "temperature": 0.0,
                            "stream": True, "stream_options": {"include_usage": True}}
    if config.is_chat:
        body["messages"] = prompt.messages()
    else:
        body["prompt"] = prompt.completion_prompt
    if config.ignore_eos:
        body["ignore_eos"] = True
    if is_structured and config.json_schema is not None:
        if config.is_chat:
            body["response_format"] = {"type": "json_schema",
                                       "json_schema": {"name": "bench", "schema": config.json_schema, "strict": True}}
        else:
            body["structured_outputs"] = {"json": config.json_schema}
    return body


def _chunk_text(choice: dict[str, Any], is_chat: bool) -> str | None:
    """The text a streamed choice carries, or None when it carries no tokens.

    Completions: every chunk with a choice is a step's tokens, even when its text is empty (a special
    token, or bytes of a character not yet complete). Chat: the first chunk only announces the role
    and the last may only carry finish_reason; a chunk counts when it has content, reasoning or tool calls.
    """
    if not is_chat:
        return choice.get("text") or ""
    delta = choice.get("delta") or {}
    parts = [delta.get(key) for key in ("content", "reasoning_content", "reasoning")]
    if any(parts) or delta.get("tool_calls"):
        return delta.get("content") or ""
    return None


async def _one_request(client: httpx.AsyncClient, config: LoadConfig, prompt: BenchPrompt,
                       is_structured: bool = False) -> RequestResult:
    body = request_body(config, prompt, is_structured)
    result = RequestResult(ok=False, is_structured=is_structured)
    start = time.perf_counter()
    last = start
    num_chunks = 0
    pieces: list[str] = []
    try:
        async with client.stream("POST", config.url, json=body, headers=config.headers) as response:
            if response.status_code != 200:
                result.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = str(chunk["error"])
                    return result
                now = time.perf_counter()
                for choice in chunk.get("choices") or []:
                    result.finish_reason = choice.get("finish_reason") or result.finish_reason
                    text = _chunk_text(choice, config.is_chat)
                    if text is None:
                        continue
                    pieces.append(text)
                    if num_chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itls.append(now - last)
                    num_chunks += 1
                    last = now
                usage = chunk.get("usage")
                if usage:
                    result.prompt_tokens = usage.get("prompt_tokens", 0)
                    result.output_tokens = usage.get("completion_tokens", 0)
    except (httpx.HTTPError, json.JSONDecodeError) as error:
        result.error = f"{type(error).__name__}: {error}"
        return result
    result.e2e = time.perf_counter() - start
    result.text = "".join(pieces)
    result.output_tokens = result.output_tokens or num_chunks
    result.prompt_tokens = result.prompt_tokens or len(prompt.token_ids)
    result.ok = num_chunks > 0
    if not result.ok:
        result.error = "no tokens in the stream"
    return result


async def run_load(config: LoadConfig, prompts: list[BenchPrompt], show_progress: bool = True
                   ) -> tuple[list[RequestResult], float]:
    """Send every prompt, at most `max_concurrency` in flight, arrivals Poisson at `request_rate`/s."""
    semaphore = asyncio.Semaphore(config.max_concurrency)
    rng = random.Random(config.seed)
    structured = config.structured_indices(len(prompts))
    progress = tqdm(total=len(prompts), desc="Requests", disable=not show_progress)
    num_connections = config.max_concurrency + 4
    limits = httpx.Limits(max_connections=num_connections, max_keepalive_connections=num_connections)

    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30.0), limits=limits) as client:
        async def limited(index: int, prompt: BenchPrompt) -> RequestResult:
            async with semaphore:
                result = await _one_request(client, config, prompt, index in structured)
                progress.update(1)
                return result

        start = time.perf_counter()
        tasks = []
        for index, prompt in enumerate(prompts):
            tasks.append(asyncio.create_task(limited(index, prompt)))
            if config.request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(config.request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    progress.close()
    return results, duration


def first_served_model(base_url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=30)
    response.raise_for_status()
    return response.json()["data"][0]["id"]
