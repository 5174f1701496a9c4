"""`pagedserve bench serve`: load-test any OpenAI-compatible server (ours, vLLM, llama-server).

Each request streams from /v1/completions; TTFT is the time to the first chunk with tokens, ITL the
gaps between later chunks, TPOT (E2E - TTFT) / (output tokens - 1), E2E the whole request. Output
and prompt token counts come from the server's usage report when it sends one.
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import numpy as np
from tqdm.auto import tqdm

from pagedserve.bench.datasets import BenchPrompt


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    e2e: float = 0.0
    itls: list[float] = field(default_factory=list)
    error: str = ""


async def _one_request(client: httpx.AsyncClient, url: str, model: str, prompt: BenchPrompt, ignore_eos: bool,
                       headers: dict[str, str]) -> RequestResult:
    body = {"model": model, "prompt": prompt.text, "max_tokens": prompt.output_len, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}
    if ignore_eos:
        body["ignore_eos"] = True
    result = RequestResult(ok=False)
    start = time.perf_counter()
    last = start
    num_chunks = 0
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
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
                # A chunk with choices carries a step's tokens, even when their text is empty (a special
                # token, or bytes of a character not yet complete): it counts for TTFT and ITL.
                if chunk.get("choices"):
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
    result.output_tokens = result.output_tokens or num_chunks
    result.prompt_tokens = result.prompt_tokens or len(prompt.token_ids)
    result.ok = num_chunks > 0
    if not result.ok:
        result.error = "no tokens in the stream"
    return result


async def run_load(base_url: str, model: str, prompts: list[BenchPrompt], max_concurrency: int,
                   request_rate: float, ignore_eos: bool, api_key: str | None, seed: int,
                   show_progress: bool = True) -> tuple[list[RequestResult], float]:
    """Send every prompt, at most `max_concurrency` in flight, arrivals Poisson at `request_rate`/s."""
    url = base_url.rstrip("/") + "/v1/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    semaphore = asyncio.Semaphore(max_concurrency)
    rng = random.Random(seed)
    progress = tqdm(total=len(prompts), desc="Requests", disable=not show_progress)
    limits = httpx.Limits(max_connections=max_concurrency + 4, max_keepalive_connections=max_concurrency + 4)

    async with httpx.AsyncClient(timeout=httpx.Timeout(None, connect=30.0), limits=limits) as client:
        async def limited(prompt: BenchPrompt) -> RequestResult:
            async with semaphore:
                result = await _one_request(client, url, model, prompt, ignore_eos, headers)
                progress.update(1)
                return result

        start = time.perf_counter()
        tasks = []
        for prompt in prompts:
            tasks.append(asyncio.create_task(limited(prompt)))
            if request_rate != float("inf"):
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    progress.close()
    return results, duration


def summarize(results: list[RequestResult], duration: float, max_concurrency: int, request_rate: float
              ) -> dict[str, Any]:
    """The report: throughputs, and mean/median/p99 of TTFT, TPOT, ITL and E2E in milliseconds."""
    done = [r for r in results if r.ok]
    report: dict[str, Any] = {
        "completed": len(done), "failed": len(results) - len(done), "duration_s": duration,
        "max_concurrency": max_concurrency, "request_rate": request_rate,
        "total_input_tokens": sum(r.prompt_tokens for r in done),
        "total_output_tokens": sum(r.output_tokens for r in done),
    }
    report["request_throughput"] = len(done) / duration
    report["output_throughput"] = report["total_output_tokens"] / duration
    report["total_token_throughput"] = (report["total_input_tokens"] + report["total_output_tokens"]) / duration
    tpots = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    series = {"ttft": [r.ttft for r in done], "tpot": tpots, "itl": [g for r in done for g in r.itls],
              "e2el": [r.e2e for r in done]}
    for name, values in series.items():
        values_ms = np.array(values or [0.0]) * 1000
        report[f"mean_{name}_ms"] = float(values_ms.mean())
        report[f"median_{name}_ms"] = float(np.median(values_ms))
        report[f"p99_{name}_ms"] = float(np.percentile(values_ms, 99))
    report["errors"] = sorted({r.error for r in results if not r.ok})[:5]
    return report


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"{'Successful requests:':<34}{report['completed']}",
        f"{'Failed requests:':<34}{report['failed']}",
        f"{'Maximum concurrency:':<34}{report['max_concurrency']}",
        f"{'Benchmark duration (s):':<34}{report['duration_s']:.2f}",
        f"{'Total input tokens:':<34}{report['total_input_tokens']}",
        f"{'Total generated tokens:':<34}{report['total_output_tokens']}",
        f"{'Request throughput (req/s):':<34}{report['request_throughput']:.2f}",
        f"{'Output token throughput (tok/s):':<34}{report['output_throughput']:.2f}",
        f"{'Total token throughput (tok/s):':<34}{report['total_token_throughput']:.2f}",
    ]
    for name, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st)"),
                        ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        lines.append(f"---{title}---")
        for stat in ("mean", "median", "p99"):
            lines.append(f"{f'{stat.capitalize()} {name.upper()} (ms):':<34}{report[f'{stat}_{name}_ms']:.2f}")
    for error in report["errors"]:
        lines.append(f"error: {error}")
    return "\n".join(lines)


def first_served_model(base_url: str, api_key: str | None) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    response = httpx.get(base_url.rstrip("/") + "/v1/models", headers=headers, timeout=30)
    response.raise_for_status()
    return response.json()["data"][0]["id"]


def save_report(report: dict[str, Any], path: str, config: dict[str, Any]) -> None:
    with open(path, "w") as file:
        json.dump({**config, **report}, file, indent=2)

