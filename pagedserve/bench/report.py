"""The report of a `bench serve` run: throughputs, latency statistics, output lengths, and for
structured requests how they ended and whether their answers match the schema."""
from __future__ import annotations

import json
from collections import Counter
from typing import Any

import numpy as np

from pagedserve.bench.serve import RequestResult


def summarize(results: list[RequestResult], duration: float, max_concurrency: int, request_rate: float,
              json_schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """Throughputs, and mean/median/p99 of TTFT, TPOT, ITL and E2E in milliseconds.

    Output lengths are reported beside output tok/s because a grammar that completes ends its answer
    even with ignore_eos: a structured run may generate fewer tokens, and tok/s alone would hide it.
    """
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
    output_lens = np.array([r.output_tokens for r in done] or [0])
    report["mean_output_tokens"] = float(output_lens.mean())
    report["min_output_tokens"] = int(output_lens.min())
    report["max_output_tokens"] = int(output_lens.max())
    report["finish_reasons"] = dict(Counter(str(r.finish_reason) for r in done))
    tpots = [(r.e2e - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    series = {"ttft": [r.ttft for r in done], "tpot": tpots, "itl": [g for r in done for g in r.itls],
              "e2el": [r.e2e for r in done]}
    for name, values in series.items():
        values_ms = np.array(values or [0.0]) * 1000
        report[f"mean_{name}_ms"] = float(values_ms.mean())
        report[f"median_{name}_ms"] = float(np.median(values_ms))
        report[f"p99_{name}_ms"] = float(np.percentile(values_ms, 99))
    if json_schema is not None:
        report.update(_structured_counts(done, json_schema))
    report["errors"] = sorted({r.error for r in results if not r.ok})[:5]
    return report


def _structured_counts(done: list[RequestResult], json_schema: dict[str, Any]) -> dict[str, Any]:
    """How many requests carried the schema, how many the grammar ended (finish_reason stop), and how
    many of those answers parse and validate (an answer cut at max_tokens cannot be whole JSON)."""
    import jsonschema

    structured = [r for r in done if r.is_structured]
    ended = [r for r in structured if r.finish_reason == "stop"]
    validator = jsonschema.Draft202012Validator(json_schema)
    num_valid = 0
    for result in ended:
        try:
            num_valid += validator.is_valid(json.loads(result.text))
        except json.JSONDecodeError:
            pass
    return {"structured_requests": len(structured), "structured_stopped": len(ended),
            "structured_valid": num_valid}


def format_report(report: dict[str, Any]) -> str:
    lines = [
        f"{'Successful requests:':<34}{report['completed']}",
        f"{'Failed requests:':<34}{report['failed']}",
        f"{'Maximum concurrency:':<34}{report['max_concurrency']}",
        f"{'Benchmark duration (s):':<34}{report['duration_s']:.2f}",
        f"{'Total input tokens:':<34}{report['total_input_tokens']}",
        f"{'Total generated tokens:':<34}{report['total_output_tokens']}",
        f"{'Output tokens per request:':<34}{report['mean_output_tokens']:.1f} mean, "
        f"{report['min_output_tokens']}-{report['max_output_tokens']}",
        f"{'Finish reasons:':<34}{', '.join(f'{k} {v}' for k, v in sorted(report['finish_reasons'].items()))}",
        f"{'Request throughput (req/s):':<34}{report['request_throughput']:.2f}",
        f"{'Output token throughput (tok/s):':<34}{report['output_throughput']:.2f}",
        f"{'Total token throughput (tok/s):':<34}{report['total_token_throughput']:.2f}",
    ]
    if "structured_requests" in report:
        lines.append(f"{'Structured requests:':<34}{report['structured_requests']} "
                     f"({report['structured_stopped']} ended by the grammar, "
                     f"{report['structured_valid']} of those valid JSON for the schema)")
    for name, title in (("ttft", "Time to First Token"), ("tpot", "Time per Output Token (excl. 1st)"),
                        ("itl", "Inter-token Latency"), ("e2el", "End-to-end Latency")):
        lines.append(f"---{title}---")
        for stat in ("mean", "median", "p99"):
            lines.append(f"{f'{stat.capitalize()} {name.upper()} (ms):':<34}{report[f'{stat}_{name}_ms']:.2f}")
    for error in report["errors"]:
        lines.append(f"error: {error}")
    return "\n".join(lines)


def save_report(report: dict[str, Any], path: str, config: dict[str, Any]) -> None:
    with open(path, "w") as file:
        json.dump({**config, **report}, file, indent=2)
