"""`make soak` (not in CI): many streams against a live server for minutes, as careless clients send them.

`python -m tests.soak [--minutes 10] [--streams 64]` starts `pagedserve serve` with the default model, then
each of the streams loops over a mix: whole chat answers with n=2, stop strings and logprobs; streamed
completions the client hangs up on after a few chunks; long prompts with short answers; short prompts.
It then checks what a long-running deployment depends on, and exits 1 if any fails:

- no request failed (every answer 200, no error event in a stream);
- the server's RSS grew less than 5% from the end of a warm-up minute to the end;
- once the clients stop, no request runs and every KV block is free again;
- /metrics counted what the clients saw: finished requests and aborted ones (the hang-ups).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from tests.server_process import ServerProcess

MODEL = "smollm2-135m-instruct"
ABORTED = 'vllm:request_success_total{finished_reason="abort",model_name="%s"}' % MODEL
FINISHED_REASONS = ("stop", "length")
MAX_RSS_GROWTH = 0.05
LONG_TEXT = "The quick brown fox jumps over the lazy dog while the river keeps flowing. " * 90   # ~1,500 tokens


@dataclass
class Tally:
    finished: int = 0            # engine requests the clients saw finish
    aborted: int = 0             # streams the clients hung up on
    generated_tokens: int = 0
    errors: list[str] = field(default_factory=list)


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


async def chat_n2(client: httpx.AsyncClient, tally: Tally) -> None:
    body = {"messages": [{"role": "user", "content": random.choice(["Name three colours.", "Say hi.", "Count."])}],
            "n": 2, "max_tokens": random.randint(4, 24), "stop": ["\n\n", "."], "logprobs": True, "top_logprobs": 2}
    response = await client.post("/v1/chat/completions", json=body)
    if response.status_code != 200:
        tally.errors.append(f"chat {response.status_code}: {response.text[:200]}")
        return
    tally.finished += 1
    tally.generated_tokens += response.json()["usage"]["completion_tokens"]


async def streamed_then_hang_up(client: httpx.AsyncClient, tally: Tally) -> None:
    body = {"prompt": "Once upon a time", "max_tokens": 200, "ignore_eos": True, "stream": True}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        if response.status_code != 200:
            tally.errors.append(f"stream {response.status_code}")
            return
        num_chunks = 0
        async for line in response.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            # an error event is an object with an "error" key (the generated text may well say "error")
            if "error" in json.loads(line[6:]):
                tally.errors.append(f"stream event: {line[:200]}")
                return
            num_chunks += 1
            if num_chunks >= random.randint(2, 8):
                break
    tally.aborted += 1


async def long_prompt(client: httpx.AsyncClient, tally: Tally) -> None:
    body = {"prompt": LONG_TEXT[:random.randint(1000, len(LONG_TEXT))], "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}
    async with client.stream("POST", "/v1/completions", json=body) as response:
        events = [json.loads(line[6:]) async for line in response.aiter_lines()
                  if line.startswith("data: ") and line != "data: [DONE]"]
    if response.status_code != 200 or any("error" in event for event in events):
        tally.errors.append(f"long prompt {response.status_code}: {str(events[-1:])[:200]}")
        return
    tally.finished += 1
    tally.generated_tokens += events[-1]["usage"]["completion_tokens"]


async def short_ollama(client: httpx.AsyncClient, tally: Tally) -> None:
    body = {"model": MODEL, "prompt": "Hi", "stream": False, "options": {"num_predict": random.randint(2, 16)}}
    response = await client.post("/api/generate", json=body)
    if response.status_code != 200:
        tally.errors.append(f"ollama {response.status_code}: {response.text[:200]}")
        return
    tally.finished += 1
    tally.generated_tokens += response.json()["eval_count"]


KINDS = (chat_n2, streamed_then_hang_up, long_prompt, short_ollama)


async def run_clients(server: ServerProcess, num_streams: int, seconds: float, tally: Tally) -> None:
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=num_streams + 4)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=600, limits=limits) as client:
        async def stream_loop() -> None:
            while time.monotonic() < deadline:
                try:
                    await random.choice(KINDS)(client, tally)
                except httpx.HTTPError as error:
                    tally.errors.append(f"{type(error).__name__}: {error}")
        await asyncio.gather(*(stream_loop() for _ in range(num_streams)))


def finished_count(server: ServerProcess) -> float:
    return sum(server.metric('vllm:request_success_total{finished_reason="%s",model_name="%s"}' % (reason, MODEL))
               for reason in FINISHED_REASONS)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--warmup-minutes", type=float, default=1.0)
    args = parser.parse_args()
    random.seed(0)
    with ServerProcess([MODEL, "--max-model-len", "2048", "--max-num-seqs", "32"]).running() as server:
        warm, measured = Tally(), Tally()
        asyncio.run(run_clients(server, args.streams, args.warmup_minutes * 60, warm))
        server.wait_idle(timeout=120)
        rss_start, finished_before, aborted_before = rss_bytes(server.process.pid), finished_count(server), \
            server.metric(ABORTED)
        started = time.monotonic()
        asyncio.run(run_clients(server, args.streams, args.minutes * 60, measured))
        elapsed = time.monotonic() - started
        server.wait_idle(timeout=120)
        rss_end = rss_bytes(server.process.pid)
        finished_seen = finished_count(server) - finished_before
        aborted_seen = server.metric(ABORTED) - aborted_before
    growth = rss_end / rss_start - 1
    print(f"soak: {args.streams} streams for {elapsed / 60:.1f} min: {measured.finished} requests finished, "
          f"{measured.aborted} hung up on, {measured.generated_tokens} tokens generated, "
          f"{len(measured.errors) + len(warm.errors)} errors; RSS {rss_start / 2**20:.0f} -> {rss_end / 2**20:.0f} MiB "
          f"({growth:+.1%}); /metrics: {finished_seen:.0f} finished, {aborted_seen:.0f} aborted")
    failures = [*warm.errors, *measured.errors][:20]
    if growth >= MAX_RSS_GROWTH:
        failures.append(f"RSS grew {growth:.1%} (limit {MAX_RSS_GROWTH:.0%})")
    if finished_seen != measured.finished or aborted_seen != measured.aborted:
        failures.append(f"/metrics counted {finished_seen:.0f} finished and {aborted_seen:.0f} aborted; the clients "
                        f"saw {measured.finished} and {measured.aborted}")
    for failure in failures:
        print(f"FAILED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
