"""`serve --tensor-parallel-size 2` (worker ranks as processes) over real HTTP: the single-process engine's
greedy answer, and a worker killed mid-stream ends the stream with an error and the server exits non-zero
within a bound, instead of hanging."""
from __future__ import annotations

import json
import os
import re
import signal

import httpx
import pytest

from server_process import ServerProcess, wait_until
from pagedserve import LLM, SamplingParams

# Gloo notices a dead peer when its socket closes: at once, not after the collective timeout.
FAILURE_BOUND_SECONDS = 30


@pytest.fixture(scope="module")
def tp2_server(tiny_llama_dir):
    server = ServerProcess([str(tiny_llama_dir), "--served-model-name", "tiny", "--tensor-parallel-size", "2",
                            "--dtype", "float32", "--num-kv-blocks", "128", "--num-threads", "1",
                            "--cpu-threads-bind", "nobind", "--distributed-timeout-seconds", "120"])
    with server.running() as running:
        yield running


def test_tp2_serve_answers_like_one_process(tp2_server, tiny_llama_dir, restore_torch_threads):
    log = tp2_server.log()
    assert re.search(r"rank 1 of 2 \(tp 1, pp 0\): node \S+ \(127\.0\.0\.1\), pid \d+", log), log[-2000:]
    prompts = ["The capital of France is", "1, 2, 3,"]
    response = httpx.post(tp2_server.url("/v1/completions"), timeout=120,
                          json={"model": "tiny", "prompt": prompts, "max_tokens": 12, "temperature": 0})
    assert response.status_code == 200, response.text
    texts = [choice["text"] for choice in sorted(response.json()["choices"], key=lambda choice: choice["index"])]
    reference = LLM(str(tiny_llama_dir), dtype="float32", num_threads=1, cpu_threads_bind="nobind", num_kv_blocks=64)
    expected = reference.generate(prompts, SamplingParams(temperature=0, max_tokens=12))
    assert texts == [output.outputs[0].text for output in expected]
    tp2_server.check_log()


def test_a_worker_killed_mid_stream_fails_the_stream_and_health(tp2_server):
    worker_pid = int(re.search(r"rank 1 of 2 .*?, pid (\d+)", tp2_server.log()).group(1))
    body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 400, "temperature": 0, "ignore_eos": True,
            "stream": True}
    events = []
    with httpx.stream("POST", tp2_server.url("/v1/completions"), json=body, timeout=FAILURE_BOUND_SECONDS) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()
        for line in lines:
            if line.startswith("data: "):
                events.append(line)
                break
        os.kill(worker_pid, signal.SIGKILL)
        events.extend(line for line in lines if line.startswith("data: "))
    assert events[-1] != "data: [DONE]" or any('"error"' in event for event in events), events[-3:]
    errors = [json.loads(event[6:]) for event in events if '"error"' in event]
    assert errors and "worker rank failed" in errors[0]["error"]["message"], events[-3:]
    # the server stops (draining what it can) and exits non-zero, for a supervisor to restart it
    wait_until(lambda: tp2_server.process.poll() is not None, "the server to exit", timeout=FAILURE_BOUND_SECONDS)
    assert tp2_server.process.returncode == 1, tp2_server.log()[-2000:]
    assert "a worker rank failed" in tp2_server.log()
