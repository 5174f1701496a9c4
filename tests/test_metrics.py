"""Prometheus metrics and the periodic log line, fed with engine snapshots. No model, no server."""
from __future__ import annotations

import logging
from prometheus_client import generate_latest

from pagedserve.engine.llm_engine import EngineStats
from pagedserve.server.metrics import EngineMetrics
from pagedserve.outputs import CompletionOutput, RequestMetrics, RequestOutput


def stats(**changes) -> EngineStats:
    values = dict(num_running=0, num_waiting=0, kv_cache_usage=0.0, num_prompt_tokens=0, num_generation_tokens=0,
                  num_prefix_cache_queries=0, num_prefix_cache_hits=0, num_preemptions=0, num_free_blocks=90,
                  num_blocks=100)
    return EngineStats(**{**values, **changes})


def sample(metrics: EngineMetrics, name: str, **labels) -> float | None:
    return metrics.registry.get_sample_value(name, {"model_name": "m", **labels})


def finished_output(finish_reason: str = "stop", num_tokens: int = 5) -> RequestOutput:
    times = RequestMetrics(arrival_time=100.0, first_scheduled_time=100.1, first_token_time=100.5,
                           last_token_time=101.5, finished_time=101.5,
                           token_gaps=[0.1, 0.2, 0.3, 0.4][:num_tokens - 1])
    completion = CompletionOutput(0, "text", list(range(num_tokens)), finish_reason=finish_reason,
                                  num_output_tokens=num_tokens)
    return RequestOutput("r", "p", [1, 2, 3], [completion], finished=True, metrics=times)


def test_counters_grow_by_the_engines_growth_and_gauges_follow_load():
    metrics = EngineMetrics("m", log_interval=None)
    metrics.on_step(stats(num_running=2, num_waiting=1, kv_cache_usage=0.25, num_prompt_tokens=40,
                          num_generation_tokens=3, num_prefix_cache_queries=64, num_prefix_cache_hits=32), [])
    metrics.on_step(stats(num_prompt_tokens=50, num_generation_tokens=10, num_prefix_cache_queries=64,
                          num_prefix_cache_hits=32, num_preemptions=1, num_free_blocks=100), [finished_output()])
    assert sample(metrics, "vllm:prompt_tokens_total") == 50
    assert sample(metrics, "vllm:generation_tokens_total") == 10
    assert sample(metrics, "vllm:prefix_cache_queries_total") == 64
    assert sample(metrics, "vllm:prefix_cache_hits_total") == 32
    assert sample(metrics, "vllm:num_preemptions_total") == 1
    assert sample(metrics, "vllm:num_requests_running") == 0
    assert sample(metrics, "pagedserve:kv_cache_free_blocks") == sample(metrics, "pagedserve:kv_cache_total_blocks")
    assert sample(metrics, "vllm:request_success_total", finished_reason="stop") == 1


def test_latency_histograms_of_a_finished_request():
    metrics = EngineMetrics("m", log_interval=None)
    metrics.record_finished(finished_output(num_tokens=5))
    assert abs(sample(metrics, "vllm:time_to_first_token_seconds_sum") - 0.5) < 1e-6
    assert abs(sample(metrics, "vllm:e2e_request_latency_seconds_sum") - 1.5) < 1e-6
    assert sample(metrics, "vllm:inter_token_latency_seconds_count") == 4           # 5 tokens, 4 gaps
    assert abs(sample(metrics, "vllm:inter_token_latency_seconds_sum") - 1.0) < 1e-6
    assert sample(metrics, "vllm:time_per_output_token_seconds_count") == 4
    # Each real gap lands in its own bucket: 0.1 and 0.2 are <= 0.2, 0.3 and 0.4 are not.
    assert sample(metrics, "vllm:inter_token_latency_seconds_bucket", le="0.2") == 2
    metrics.record_aborted()
    assert sample(metrics, "vllm:request_success_total", finished_reason="abort") == 1


def test_exposition_uses_vllm_names_and_each_app_has_its_own_registry():
    first, second = EngineMetrics("m"), EngineMetrics("m")
    first.on_step(stats(num_generation_tokens=7), [])
    text = generate_latest(first.registry).decode()
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:gpu_cache_usage_perc", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
                 "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
                 "vllm:e2e_request_latency_seconds_bucket", "vllm:prefix_cache_queries_total",
                 "vllm:prefix_cache_hits_total", "vllm:num_preemptions_total"):
        assert name in text, name
    assert 'vllm:generation_tokens_total{model_name="m"} 7.0' in text
    assert second.registry.get_sample_value("vllm:generation_tokens_total", {"model_name": "m"}) == 0


def test_the_periodic_line_while_busy_and_quiet_when_idle(caplog, monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr("pagedserve.server.metrics.time.monotonic", lambda: clock[0])
    metrics = EngineMetrics("m", log_interval=10.0)
    with caplog.at_level(logging.INFO, logger="pagedserve.server.metrics"):
        clock[0] += 10
        busy = stats(num_running=1, num_waiting=2, kv_cache_usage=0.5, num_prompt_tokens=100,
                     num_generation_tokens=50, num_prefix_cache_queries=200, num_prefix_cache_hits=50)
        metrics.on_step(busy, [])
        clock[0] += 5
        metrics.on_step(busy, [])                      # too soon for another line
        clock[0] += 10
        metrics.on_step(stats(num_prompt_tokens=100, num_generation_tokens=50, num_prefix_cache_queries=200,
                              num_prefix_cache_hits=50), [])   # idle: nothing happened since the last line
    assert [record.getMessage() for record in caplog.records] == [
        "m: Avg prompt throughput: 10.0 tokens/s, Avg generation throughput: 5.0 tokens/s, Running: 1 reqs, "
        "Waiting: 2 reqs, KV cache usage: 50.0%, Prefix cache hit rate: 25.0%"]
