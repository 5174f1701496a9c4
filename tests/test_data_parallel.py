"""Data parallel serving (`serve --data-parallel-size 2`): two engine replica processes behind one API server.

The router's policy first (no model: milliseconds), then the real SmolLM2 GGUF over HTTP: concurrent requests
answered with the single engine's greedy tokens and spread over both replicas, a shared prefix sent back to
the replica that cached it, a disconnect freeing the blocks on its replica, and a killed replica failing its
streams and the server.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import pickle
import re
import signal

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from server_process import ServerProcess, wait_until
from pagedserve import LLM, SamplingParams
from pagedserve.cli.main import serve_configs
from pagedserve.config import EngineConfig
from pagedserve.engine.async_engine import ACCEPTED, EngineOverloadedError, RequestFailedError
from pagedserve.engine.llm_engine import EngineStats, LLMEngine
from pagedserve.engine.router import MAX_EXTRA_LOAD, Router, prefix_hashes
from pagedserve.server.metrics import EngineMetrics, MetricFamilies

MODEL = "smollm2-135m-instruct"
NAME = "smollm2"
SERVER_ARGS = [MODEL, "--served-model-name", NAME, "--data-parallel-size", "2", "--max-model-len", "1024",
               "--num-kv-blocks", "256", "--log-stats-interval", "1"]
# A replica's death closes its pipe at once; the server then drains and exits.
FAILURE_BOUND_SECONDS = 60


# ---- the router (no model) ------------------------------------------------------------------------

def test_requests_go_to_the_least_loaded_replica_and_alternate_when_equal():
    router = Router([64, 64], block_size=4)
    assert [router.route(f"r{index}", [index] * 3) for index in range(4)] == [0, 1, 0, 1]
    router.release("r0")
    router.release("r2")
    assert router.loads == [0, 2]
    assert router.route("r4", [9, 9, 9], load=3) == 0      # n = 3 counts three sequences
    assert router.loads == [3, 2]
    assert router.release("r4") == 0 and router.release("r4") is None


def test_a_shared_prefix_prefers_the_replica_that_holds_it_unless_it_is_much_busier():
    router = Router([64, 64], block_size=4)
    prefix = list(range(100, 116))                          # four full blocks
    first = router.route("a", prefix + [1])
    assert router.route("b", prefix + [2]) == first         # the rotation alone would pick the other one
    assert router.num_affinity_hits == 1
    # a prompt that only starts like it (a shared chat header) is balanced instead
    assert router.route("c", prefix[:4] + list(range(50))) != first
    router.route("busy", prefix + [9], load=MAX_EXTRA_LOAD + 5)   # drawn there by the prefix too
    assert router.loads[first] - router.loads[1 - first] > MAX_EXTRA_LOAD
    assert router.route("d", prefix + [3]) == 1 - first


def test_the_remembered_prefixes_are_bounded_by_each_replicas_kv_blocks():
    router = Router([3, 3], block_size=2)
    router.route("a", list(range(40)))
    assert all(len(cached) <= 3 for cached in router._cached)
    assert prefix_hashes([1, 2, 3, 4, 5], 2) == prefix_hashes([1, 2, 3, 4, 6], 2)   # only full blocks
    assert prefix_hashes([1, 2, 3, 4], 2)[1] != prefix_hashes([9, 9, 3, 4], 2)[1]   # chained


def test_errors_cross_the_pipe_whole():
    overloaded = pickle.loads(pickle.dumps(EngineOverloadedError("busy", "queue_timeout", retry_after=7)))
    assert (str(overloaded), overloaded.reason, overloaded.retry_after) == ("busy", "queue_timeout", 7)
    failed = pickle.loads(pickle.dumps(RequestFailedError("it failed", KeyError("detokenizer"))))
    assert isinstance(failed, RequestFailedError) and "KeyError" in str(failed.__cause__)
    assert pickle.loads(pickle.dumps(ACCEPTED)) is ACCEPTED


def test_metrics_per_engine_and_the_total_line(caplog, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("pagedserve.server.metrics.time.monotonic", lambda: clock[0])
    metrics = EngineMetrics("m", log_interval=10.0, families=MetricFamilies(per_engine=True))
    metrics.on_step(engine_stats(), [], 1)   # each replica reports from its start
    with caplog.at_level(logging.INFO, logger="pagedserve.server.metrics"):
        clock[0] += 10
        metrics.on_step(engine_stats(num_running=2, num_generation_tokens=30), [], 0)
        metrics.on_step(engine_stats(num_running=1, num_generation_tokens=70), [], 1)
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0].startswith("m engine 0: Avg prompt throughput: 0.0 tokens/s, Avg generation throughput: 3.0")
    assert lines[1].startswith("m engine 1: Avg prompt throughput: 0.0 tokens/s, Avg generation throughput: 7.0")
    assert lines[2].startswith("m total of 2 engines: Avg prompt throughput: 0.0 tokens/s, Avg generation "
                               "throughput: 10.0 tokens/s, Running: 3 reqs")
    registry = metrics.registry
    assert registry.get_sample_value("vllm:generation_tokens_total", {"model_name": "m", "engine": "1"}) == 70
    assert registry.get_sample_value("vllm:num_requests_running", {"model_name": "m", "engine": "0"}) == 2
    metrics.record_aborted(1)
    assert registry.get_sample_value("vllm:request_success_total",
                                     {"model_name": "m", "engine": "1", "finished_reason": "abort"}) == 1


def engine_stats(**changes) -> EngineStats:
    values = dict(num_running=0, num_waiting=0, kv_cache_usage=0.0, num_prompt_tokens=0, num_generation_tokens=0,
                  num_prefix_cache_queries=0, num_prefix_cache_hits=0, num_preemptions=0, num_free_blocks=90,
                  num_blocks=100)
    return EngineStats(**{**values, **changes})


# ---- configuration --------------------------------------------------------------------------------

def test_dp_flags_and_what_they_cannot_combine_with():
    assert serve_configs(["serve", "-dp", "2"], {})[0].data_parallel_size == 2
    assert serve_configs(["serve", "--data-parallel-size", "3"], {})[0].data_parallel_size == 3
    with pytest.raises(ValueError, match="data_parallel_size 2 with tensor_parallel_size 2"):
        EngineConfig(data_parallel_size=2, tensor_parallel_size=2)
    with pytest.raises(ValueError, match="--enable-lora needs data_parallel_size 1"):
        EngineConfig(data_parallel_size=2, enable_lora=True)
    with pytest.raises(ValueError, match="ray is not supported"):
        EngineConfig(data_parallel_size=2, distributed_executor_backend="ray")
    with pytest.raises(ValueError, match="must be positive"):
        EngineConfig(data_parallel_size=0)
    # the offline engine is one replica: refused before anything loads
    with pytest.raises(ValueError, match="served by `pagedserve serve`"):
        LLMEngine(EngineConfig(data_parallel_size=2))


# ---- over HTTP ------------------------------------------------------------------------------------

def samples(server: ServerProcess, name: str) -> dict[str, float]:
    """engine label -> the sample `name` (summed over its other labels) for NAME."""
    text = httpx.get(server.url("/metrics"), timeout=10).text
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels.get("model_name") == NAME:
                engine = sample.labels["engine"]
                totals[engine] = totals.get(engine, 0.0) + sample.value
    return totals


def finished(server: ServerProcess) -> dict[str, float]:
    return samples(server, "vllm:request_success_total")


def replica_pids(server: ServerProcess) -> dict[str, int]:
    return {index: int(pid) for index, pid in re.findall(r"data parallel replica (\d) of 2: pid (\d+)", server.log())}


@pytest.fixture(scope="module")
def dp2_server():
    with ServerProcess(SERVER_ARGS).running() as running:
        yield running


def test_replicas_start_each_on_its_own_cores(dp2_server):
    log = dp2_server.log()
    assert len(replica_pids(dp2_server)) == 2, log[-3000:]
    cores = re.findall(r"data parallel replica \d of 2: pid \d+, (\d+) threads on cores (\S+)", log)
    if len(os.sched_getaffinity(0)) >= 2:
        assert cores[0][1] != cores[1][1], cores                        # a share each, pinned
        assert {threads for threads, _ in cores} == {str(len(os.sched_getaffinity(0)) // 2)}, cores


def test_concurrent_requests_are_answered_like_one_engine_and_spread_over_both(dp2_server, restore_torch_threads):
    prompts = [f"Question {index}: what is {index} plus {index * 3}? Answer:" for index in range(32)]
    before = finished(dp2_server)

    async def ask_all() -> list[str]:
        async with httpx.AsyncClient(timeout=600) as client:
            responses = await asyncio.gather(*(
                client.post(dp2_server.url("/v1/completions"),
                            json={"model": NAME, "prompt": prompt, "max_tokens": 8, "temperature": 0})
                for prompt in prompts))
        assert all(response.status_code == 200 for response in responses), [r.text for r in responses][:3]
        return [response.json()["choices"][0]["text"] for response in responses]

    texts = asyncio.run(ask_all())
    # one engine, one thread (as each replica has on 2 cores), all prompts at once
    reference = LLM(MODEL, max_model_len=1024, num_kv_blocks=256, num_threads=1, cpu_threads_bind="nobind")
    expected = [output.outputs[0].text for output in
                reference.generate(prompts, SamplingParams(temperature=0, max_tokens=8))]
    assert texts == expected
    after = finished(dp2_server)
    served = {engine: after[engine] - before.get(engine, 0.0) for engine in after}
    assert sum(served.values()) == 32 and served.get("0", 0) > 0 and served.get("1", 0) > 0, served
    assert set(samples(dp2_server, "vllm:generation_tokens_total")) == {"0", "1"}
    dp2_server.wait_for_log("total of 2 engines: Avg prompt throughput", timeout=30)
    dp2_server.check_log()


def test_a_shared_long_prefix_goes_back_to_the_replica_that_cached_it(dp2_server):
    prefix = "Here is a long document that many requests share. " * 30     # ~300 tokens: 18+ blocks

    def ask(suffix: str) -> str:
        """The engine that answered."""
        before = finished(dp2_server)
        response = httpx.post(dp2_server.url("/v1/completions"), timeout=120,
                              json={"model": NAME, "prompt": prefix + suffix, "max_tokens": 2, "temperature": 0})
        assert response.status_code == 200, response.text
        after = finished(dp2_server)
        [engine] = [engine for engine in after if after[engine] > before.get(engine, 0.0)]
        return engine

    first = ask("Question one?")
    hits_before = samples(dp2_server, "vllm:prefix_cache_hits_total")
    assert ask("Question two?") == first
    hits = samples(dp2_server, "vllm:prefix_cache_hits_total")
    assert hits[first] - hits_before.get(first, 0.0) >= 16 * 16, (hits_before, hits)
    other = "1" if first == "0" else "0"
    assert hits.get(other, 0.0) == hits_before.get(other, 0.0)
    # without the prefix, the next request balances onto the other replica
    response = httpx.post(dp2_server.url("/v1/completions"), timeout=120,
                          json={"model": NAME, "prompt": "Hi", "max_tokens": 2, "temperature": 0})
    assert response.status_code == 200
    dp2_server.check_log()


def test_structured_output_reaches_both_replicas(dp2_server):
    """The compiled grammar (which does not pickle) crosses to each replica once, and constrains every answer."""
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "age": {"type": "integer"}}, "required": ["name", "age"]}
    before = finished(dp2_server)
    for index in range(4):   # the replicas take turns: each gets the grammar once, then its key
        response = httpx.post(dp2_server.url("/v1/chat/completions"), timeout=120, json={
            "model": NAME, "messages": [{"role": "user", "content": f"Describe person number {index} as JSON."}],
            "max_tokens": 60, "temperature": 0,
            "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}})
        assert response.status_code == 200, response.text
        answer = json.loads(response.json()["choices"][0]["message"]["content"])
        assert set(answer) == {"name", "age"} and isinstance(answer["age"], int), answer
    after = finished(dp2_server)
    assert all(after[engine] - before.get(engine, 0.0) >= 1 for engine in ("0", "1")), (before, after)
    dp2_server.check_log()


def test_a_disconnect_frees_the_blocks_on_its_replica(dp2_server):
    body = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 600, "temperature": 0, "ignore_eos": True,
            "stream": True}
    aborted_before = samples(dp2_server, "vllm:request_success_total")
    with httpx.stream("POST", dp2_server.url("/v1/completions"), json=body, timeout=120) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()   # NOTE: held, since a collected line iterator closes the response
        for line in lines:
            if line.startswith("data: "):
                break
        running = wait_until(lambda: [engine for engine, value in samples(dp2_server, "vllm:num_requests_running")
                                      .items() if value == 1], "the stream's replica to run it")
        [engine] = running
        free = samples(dp2_server, "pagedserve:kv_cache_free_blocks")
        total = samples(dp2_server, "pagedserve:kv_cache_total_blocks")
        assert free[engine] < total[engine]
    # the client went away: its replica aborts the request and frees its blocks
    wait_until(lambda: samples(dp2_server, "pagedserve:kv_cache_free_blocks") ==
               samples(dp2_server, "pagedserve:kv_cache_total_blocks")
               and not any(samples(dp2_server, "vllm:num_requests_running").values()),
               "every KV block free on both replicas", timeout=30)
    text = httpx.get(dp2_server.url("/metrics"), timeout=10).text
    aborted = [s for f in text_string_to_metric_families(text) for s in f.samples
               if s.name == "vllm:request_success_total" and s.labels.get("finished_reason") == "abort"]
    assert [s.labels["engine"] for s in aborted if s.value > 0] == [engine], (aborted, aborted_before)
    dp2_server.check_log()


def test_embeddings_from_both_replicas_equal_one_engines(restore_torch_threads):
    """A pooling model behind replicas: each input's embedding as the offline engine computes it."""
    from tests.test_embeddings import minilm_dir

    inputs = ["A cat sits on the mat.", "Data parallel replicas share one API server."]
    server = ServerProcess([str(minilm_dir()), "--served-model-name", NAME, "--data-parallel-size", "2"])
    with server.running():
        answers = []
        for _ in range(2):   # one request per replica (they take turns)
            response = httpx.post(server.url("/v1/embeddings"), json={"model": NAME, "input": inputs}, timeout=60)
            assert response.status_code == 200, response.text
            answers.append([item["embedding"] for item in response.json()["data"]])
        served = finished(server)
        assert served.get("0", 0) > 0 and served.get("1", 0) > 0, served
        server.check_log()
    reference = LLM(str(minilm_dir()), num_threads=1, cpu_threads_bind="nobind").embed(inputs)
    for answer in answers:
        for ours, theirs in zip(answer, reference):
            assert max(abs(a - b) for a, b in zip(ours, theirs.outputs.embedding)) < 1e-5


def test_a_killed_replica_fails_its_stream_and_the_server_exits_non_zero():
    server = ServerProcess(SERVER_ARGS)
    with server.running():
        pids = replica_pids(server)
        body = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 600, "temperature": 0, "ignore_eos": True,
                "stream": True}
        events = []
        with httpx.stream("POST", server.url("/v1/completions"), json=body, timeout=FAILURE_BOUND_SECONDS) as stream:
            assert stream.status_code == 200
            lines = stream.iter_lines()
            for line in lines:
                if line.startswith("data: "):
                    events.append(line)
                    break
            [engine] = wait_until(lambda: [engine for engine, value in samples(server, "vllm:num_requests_running")
                                           .items() if value == 1], "the stream's replica to run it")
            os.kill(pids[engine], signal.SIGKILL)
            events.extend(line for line in lines if line.startswith("data: "))
        errors = [json.loads(event[6:]) for event in events if '"error"' in event]
        assert errors and f"data parallel replica {engine}" in errors[0]["error"]["message"], events[-3:]
        wait_until(lambda: server.process.poll() is not None, "the server to exit", timeout=FAILURE_BOUND_SECONDS)
        assert server.process.returncode == 1, server.log()[-3000:]
        log = server.log()
        assert f"data parallel replica {engine} (pid {pids[engine]}) was killed by signal 9" in log
        # the dead-engine path: /health answers 500 from then on (the server stops listening soon after)
        assert f"the engine of {NAME} has stopped (RankFailedError: data parallel replica {engine}" in log


def test_a_hung_replica_is_killed_after_the_timeout_and_the_server_exits_non_zero():
    server = ServerProcess([*SERVER_ARGS, "--distributed-timeout-seconds", "5"])
    with server.running():
        pid = replica_pids(server)["1"]
        os.kill(pid, signal.SIGSTOP)   # alive, but it steps and reports no more
        try:
            wait_until(lambda: server.process.poll() is not None, "the server to exit", timeout=FAILURE_BOUND_SECONDS)
        finally:
            if os.path.exists(f"/proc/{pid}"):
                os.kill(pid, signal.SIGKILL)
        assert server.process.returncode == 1, server.log()[-3000:]
        assert f"data parallel replica 1 (pid {pid}) sent nothing for" in server.log()
