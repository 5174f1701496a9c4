"""Prometheus metrics under vLLM's names (so its dashboards work), and the periodic throughput log line.

`EngineMetrics.on_step` is the engine loop's step hook: it runs on the engine thread after every
step and about once a second when idle, gets the engine's counters, and turns their growth into
Prometheus counters. Each app owns its registry, so several servers can live in one process.
With data parallel replicas (--data-parallel-size > 1) every vllm:* series also carries vLLM's
`engine="0"`, `engine="1"`, ... label, one per replica (sum over it for the model's total), and the
periodic line comes per replica and in total. With one engine the series keep their one label.
No torch here.
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

logger = logging.getLogger(__name__)

_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0, 7680.0)
_TOKEN_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000, 20000, 50000, 100000)


@dataclass(frozen=True)
class _Snapshot:
    """The engine's lifetime counters at one moment, to turn into per-interval growth."""

    time: float
    num_prompt_tokens: int = 0
    num_generation_tokens: int = 0
    num_prefix_cache_queries: int = 0
    num_prefix_cache_hits: int = 0
    num_preemptions: int = 0


class MetricFamilies:
    """The metrics of one server, labelled by model (and by engine, with `per_engine`): one registry however
    many models it serves."""

    def __init__(self, per_engine: bool = False) -> None:
        self.registry = CollectorRegistry()
        self.per_engine = per_engine
        labels = ["model_name", "engine"] if per_engine else ["model_name"]
        registry = self.registry

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, labels, registry=registry)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, labels, registry=registry)

        def histogram(name: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=registry)

        self.num_running = gauge("vllm:num_requests_running", "Requests in the running batch.")
        self.num_waiting = gauge("vllm:num_requests_waiting", "Requests waiting to be scheduled.")
        self.kv_cache_usage = gauge("vllm:kv_cache_usage_perc", "KV cache usage; 1 means 100 percent.")
        self.gpu_cache_usage = gauge("vllm:gpu_cache_usage_perc", "KV cache usage (older name).")
        self.num_free_blocks = gauge("pagedserve:kv_cache_free_blocks", "KV cache blocks not held by a request.")
        self.num_blocks = gauge("pagedserve:kv_cache_total_blocks", "KV cache blocks in all.")
        self.prompt_tokens = counter("vllm:prompt_tokens", "Prompt tokens computed (prefix cache hits excluded).")
        self.generation_tokens = counter("vllm:generation_tokens", "Tokens generated.")
        self.prefix_queries = counter("vllm:prefix_cache_queries", "Prompt tokens looked up in the prefix cache.")
        self.prefix_hits = counter("vllm:prefix_cache_hits", "Prompt tokens found in the prefix cache.")
        self.preemptions = counter("vllm:num_preemptions", "Sequences preempted to free KV cache.")
        self.request_success = Counter("vllm:request_success", "Finished requests by finish reason.",
                                       [*labels, "finished_reason"], registry=registry)
        self.rejected = Counter("pagedserve:requests_rejected", "Requests refused (queue_full) or dropped while "
                                "waiting (queue_timeout) for load, answered 503.", ["model_name", "reason"],
                                registry=registry)
        self.ttft = histogram("vllm:time_to_first_token_seconds", "Time to first token.", _TTFT_BUCKETS)
        self.itl = histogram("vllm:inter_token_latency_seconds", "Time between output tokens.", _ITL_BUCKETS)
        self.tpot = histogram("vllm:time_per_output_token_seconds", "Time per output token (older name).",
                              _ITL_BUCKETS)
        self.e2e = histogram("vllm:e2e_request_latency_seconds", "Arrival to last token.", _E2E_BUCKETS)
        self.queue_time = histogram("vllm:request_queue_time_seconds", "Arrival to first scheduled.", _E2E_BUCKETS)
        self.request_prompt_tokens = histogram("vllm:request_prompt_tokens", "Prompt tokens per request.",
                                               _TOKEN_BUCKETS)
        self.request_generation_tokens = histogram("vllm:request_generation_tokens", "Tokens generated per request.",
                                                   _TOKEN_BUCKETS)


_LABELLED = ("num_running", "num_waiting", "kv_cache_usage", "gpu_cache_usage", "num_free_blocks", "num_blocks",
             "prompt_tokens", "generation_tokens", "prefix_queries", "prefix_hits", "preemptions", "ttft", "itl",
             "tpot", "e2e", "queue_time", "request_prompt_tokens", "request_generation_tokens")


class _EngineSeries:
    """One engine's labelled series, and its counters seen last (to turn into growth)."""

    def __init__(self, families: MetricFamilies, labels: tuple[str, ...]) -> None:
        self.labels = labels
        for name in _LABELLED:
            setattr(self, name, getattr(families, name).labels(*labels))
        self.last = _Snapshot(time.monotonic())
        self.last_logged = self.last
        self.stats: Any = None


class EngineMetrics:
    """One model's view of the metrics: its label, and per engine (data parallel replica) the counters seen last.

    NOTE: make a new one for each engine (e.g. after a model reloads): the snapshot is per engine,
    while the counters live on in the shared families, so they keep growing across reloads.
    """

    def __init__(self, model_name: str, log_interval: float | None = 10.0,
                 families: MetricFamilies | None = None) -> None:
        """`log_interval`: seconds between throughput log lines while busy; None: never log."""
        self.families = families or MetricFamilies()
        self.registry = self.families.registry
        self._model_name = model_name
        self._log_interval = log_interval
        self._engines: dict[int, _EngineSeries] = {}
        # NOTE: data parallel replicas report from one thread each; the total line reads them all
        self._lock = threading.Lock()
        self._total_logged = _Snapshot(time.monotonic())
        self.request_success = self.families.request_success
        self.rejected = self.families.rejected
        self._series(0)

    def _series(self, engine_index: int) -> _EngineSeries:
        series = self._engines.get(engine_index)
        if series is None:
            labels = (self._model_name, str(engine_index)) if self.families.per_engine else (self._model_name,)
            with self._lock:
                series = self._engines.setdefault(engine_index, _EngineSeries(self.families, labels))
        return series

    # ---- the engine hook --------------------------------------------------------------------------

    def on_step(self, stats: Any, outputs: Iterable[Any], engine_index: int = 0) -> None:
        """The engine loop's step hook (`StepHook`): on the engine thread (a replica's reader thread)."""
        series = self._series(engine_index)
        self.record_load(stats, series)
        for output in outputs:
            if output.finished:
                self.record_finished(output, series)
        self.maybe_log(stats, series)

    def record_load(self, stats: Any, series: _EngineSeries | None = None) -> None:
        series = series or self._series(0)
        series.stats = stats
        series.num_running.set(stats.num_running)
        series.num_waiting.set(stats.num_waiting)
        series.kv_cache_usage.set(stats.kv_cache_usage)
        series.gpu_cache_usage.set(stats.kv_cache_usage)
        series.num_free_blocks.set(stats.num_free_blocks)
        series.num_blocks.set(stats.num_blocks)
        now = _snapshot(stats)
        last, series.last = series.last, now
        series.prompt_tokens.inc(max(now.num_prompt_tokens - last.num_prompt_tokens, 0))
        series.generation_tokens.inc(max(now.num_generation_tokens - last.num_generation_tokens, 0))
        series.prefix_queries.inc(max(now.num_prefix_cache_queries - last.num_prefix_cache_queries, 0))
        series.prefix_hits.inc(max(now.num_prefix_cache_hits - last.num_prefix_cache_hits, 0))
        series.preemptions.inc(max(now.num_preemptions - last.num_preemptions, 0))

    def record_finished(self, output: Any, series: _EngineSeries | None = None) -> None:
        """Latencies and counts of a finished request (a final `RequestOutput`)."""
        series = series or self._series(0)
        # an embedding request has no completions: it stops once its prompt is pooled
        reason = output.outputs[0].finish_reason if output.outputs else None
        self.request_success.labels(*series.labels, reason or "stop").inc()
        series.request_prompt_tokens.observe(len(output.prompt_token_ids))
        series.request_generation_tokens.observe(sum(c.num_output_tokens for c in output.outputs))
        metrics = output.metrics
        if metrics is None or metrics.first_token_time is None:
            return
        series.ttft.observe(max(metrics.first_token_time - metrics.arrival_time, 0.0))
        finished = metrics.finished_time or metrics.last_token_time or metrics.first_token_time
        series.e2e.observe(max(finished - metrics.arrival_time, 0.0))
        if metrics.first_scheduled_time is not None:
            series.queue_time.observe(max(metrics.first_scheduled_time - metrics.arrival_time, 0.0))
        for gap in metrics.token_gaps:
            series.itl.observe(gap)
            series.tpot.observe(gap)

    def record_unloaded(self) -> None:
        """The engine is gone (its model unloaded): nothing runs, waits or holds KV blocks."""
        for series in list(self._engines.values()):
            for gauge in (series.num_running, series.num_waiting, series.kv_cache_usage, series.gpu_cache_usage,
                          series.num_free_blocks, series.num_blocks):
                gauge.set(0)

    def record_rejected(self, reason: str) -> None:
        """A request refused or dropped for load (the queue limits); on the event loop or the engine thread."""
        self.rejected.labels(self._model_name, reason).inc()

    def record_aborted(self, engine_index: int = 0) -> None:
        """A request the server aborted (client gone, shutdown); the engine reports nothing for it."""
        self.request_success.labels(*self._series(engine_index).labels, "abort").inc()

    # ---- the periodic log line --------------------------------------------------------------------

    def maybe_log(self, stats: Any, series: _EngineSeries | None = None) -> None:
        if self._log_interval is None:
            return
        series = series or self._series(0)
        now = series.last
        since = series.last_logged
        if now.time - since.time < self._log_interval:
            return
        series.last_logged = now
        if _is_busy(since, now, stats):
            # Named, since one server may run several models, each with its own engine and line.
            where = f"{self._model_name} engine {series.labels[1]}" if self.families.per_engine else self._model_name
            logger.info("%s: %s", where, stats_line(since, now, stats))
        if self.families.per_engine:
            self._maybe_log_total()

    def _maybe_log_total(self) -> None:
        """The replicas' line summed, once per interval."""
        with self._lock:
            engines = [series for series in self._engines.values() if series.stats is not None]
            if len(engines) < 2:
                return
            now = _Snapshot(max(series.last.time for series in engines),
                            *(sum(getattr(series.last, name) for series in engines) for name in _COUNTED))
            since = self._total_logged
            # NOTE: once the interval is up and every replica has reported since the last total, so it sums
            # fresh numbers (a replica reports each step, and about once a second when idle)
            if now.time - since.time < (self._log_interval or 0.0) or any(
                    series.last.time <= since.time for series in engines):
                return
            self._total_logged = now
            total = _Totals(sum(series.stats.num_running for series in engines),
                            sum(series.stats.num_waiting for series in engines),
                            sum(series.stats.num_blocks - series.stats.num_free_blocks for series in engines)
                            / max(sum(series.stats.num_blocks for series in engines), 1))
        if _is_busy(since, now, total):
            logger.info("%s total of %d engines: %s", self._model_name, len(engines), stats_line(since, now, total))


_COUNTED = ("num_prompt_tokens", "num_generation_tokens", "num_prefix_cache_queries", "num_prefix_cache_hits",
            "num_preemptions")


@dataclass(frozen=True)
class _Totals:
    """The load of all replicas, for the total line."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float


def _is_busy(since: _Snapshot, now: _Snapshot, stats: Any) -> bool:
    return bool(stats.num_running or stats.num_waiting or now.num_generation_tokens != since.num_generation_tokens
                or now.num_prompt_tokens != since.num_prompt_tokens)


def stats_line(since: _Snapshot, now: _Snapshot, stats: Any) -> str:
    """vLLM's periodic line: throughput over the interval, load now, prefix cache hit rate so far."""
    elapsed = max(now.time - since.time, 1e-9)
    prompt_rate = (now.num_prompt_tokens - since.num_prompt_tokens) / elapsed
    generation_rate = (now.num_generation_tokens - since.num_generation_tokens) / elapsed
    queries = now.num_prefix_cache_queries
    hit_rate = now.num_prefix_cache_hits / queries if queries else 0.0
    return (f"Avg prompt throughput: {prompt_rate:.1f} tokens/s, Avg generation throughput: {generation_rate:.1f} "
            f"tokens/s, Running: {stats.num_running} reqs, Waiting: {stats.num_waiting} reqs, "
            f"KV cache usage: {stats.kv_cache_usage * 100:.1f}%, Prefix cache hit rate: {hit_rate * 100:.1f}%")


def _snapshot(stats: Any) -> _Snapshot:
    return _Snapshot(time.monotonic(), stats.num_prompt_tokens, stats.num_generation_tokens,
                     stats.num_prefix_cache_queries, stats.num_prefix_cache_hits, stats.num_preemptions)
