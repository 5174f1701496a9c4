"""`pagedserve bench`: the commands run and report every field (their speed is not asserted here)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pagedserve.bench.datasets import random_prompts
from pagedserve.loader.source import resolve_model
from pagedserve.loader.tokenizer import load_tokenizer
from tests.server_process import ServerProcess

ROOT = Path(__file__).parent.parent
LATENCY_FIELDS = [f"{stat}_{name}_ms" for name in ("ttft", "tpot", "itl", "e2el") for stat in ("mean", "median", "p99")]


def run_cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pagedserve", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_random_prompts_are_reproducible_by_seed_and_differ_across_seeds():
    tokenizer = load_tokenizer(resolve_model("smollm2-135m-instruct"))
    first = random_prompts(tokenizer, 3, 32, 8, seed=1)
    again = random_prompts(tokenizer, 3, 32, 8, seed=1)
    other = random_prompts(tokenizer, 3, 32, 8, seed=2)
    assert [p.text for p in first] == [p.text for p in again]
    assert [p.text for p in first] != [p.text for p in other]
    assert all(len(p.token_ids) == 32 and p.output_len == 8 for p in first)
    assert len({p.text for p in first}) == 3


@pytest.fixture(scope="module")
def server():
    with ServerProcess(["smollm2-135m-instruct", "--served-model-name", "bench-model",
                        "--disable-log-requests"]).running() as process:
        yield process


def test_bench_serve_reports_throughput_and_latencies(server, tmp_path):
    result_file = tmp_path / "result.json"
    done = run_cli("bench", "serve", "--base-url", server.base_url, "--tokenizer", "smollm2-135m-instruct",
                   "--dataset", "random", "--input-len", "16", "--output-len", "8", "--num-prompts", "4",
                   "--max-concurrency", "2", "--ignore-eos", "--seed", "3", "--save-result", str(result_file))
    assert done.returncode == 0, done.stderr[-2000:]
    assert "Output token throughput (tok/s):" in done.stdout and "Median TTFT (ms):" in done.stdout
    report = json.loads(result_file.read_text())
    assert report["model"] == "bench-model"                   # found on /v1/models
    assert report["completed"] == 4 and report["failed"] == 0
    assert report["total_output_tokens"] == 4 * 8             # --ignore-eos: every request runs to its length
    assert report["total_input_tokens"] >= 4 * 16 - 4
    assert report["output_throughput"] > 0 and report["request_throughput"] > 0
    for field in LATENCY_FIELDS:
        assert report[field] >= 0, field
    assert report["median_ttft_ms"] > 0 and report["median_e2el_ms"] >= report["median_ttft_ms"]


def test_bench_serve_counts_failures_for_an_unknown_model(server):
    done = run_cli("bench", "serve", "--base-url", server.base_url, "--model", "no-such-model", "--tokenizer",
                   "smollm2-135m-instruct", "--input-len", "8", "--output-len", "4", "--num-prompts", "2")
    assert done.returncode == 1
    assert "Failed requests:                  2" in done.stdout and "HTTP 404" in done.stdout


@pytest.mark.parametrize("command", ["throughput", "latency"])
def test_offline_bench_commands(command, tmp_path):
    output = tmp_path / "out.json"
    extra = ["--iterations", "1"] if command == "latency" else []
    done = run_cli("bench", command, "--model", "smollm2-135m-instruct", "--input-len", "8", "--output-len", "4",
                   "--num-prompts", "2", "--output-json", str(output), *extra)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(output.read_text())
    if command == "throughput":
        assert report["backend"] == "pagedserve" and report["output_tokens"] == 2 * 4
        assert report["output_tokens_per_s"] > 0 and report["requests_per_s"] > 0
    else:
        assert report["batch_size"] == 2 and report["avg_latency_s"] > 0 and report["decode_tokens_per_s"] > 0


def test_a_stream_of_tokens_without_text_still_counts():
    """With --ignore-eos a model may emit only special tokens: empty text, yet tokens that took time."""
    import asyncio

    import httpx

    from pagedserve.bench.datasets import BenchPrompt
    from pagedserve.bench.serve import _one_request

    chunks = [{"choices": [{"index": 0, "text": ""}]}] * 3 + [{"choices": [], "usage": {"prompt_tokens": 4,
                                                                                         "completion_tokens": 3}}]
    body = "".join(f"data: {json.dumps(chunk)}\n\n" for chunk in chunks) + "data: [DONE]\n\n"
    transport = httpx.MockTransport(lambda request: httpx.Response(200, text=body))

    async def one():
        async with httpx.AsyncClient(transport=transport) as client:
            return await _one_request(client, "http://test/v1/completions", "m", BenchPrompt([1] * 4, "x", 3),
                                      True, {})

    result = asyncio.run(one())
    assert result.ok and result.output_tokens == 3 and len(result.itls) == 2
