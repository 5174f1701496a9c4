"""Side-by-side serving comparison: start each server alone, time it to ready, load it at several
concurrencies with `pagedserve bench serve`'s client, sample its memory, stop it, print one table.

    python bench/compare.py --server pagedserve -- pagedserve serve --port 8100 --disable-log-requests \
                            --server llama-server -- /path/llama-server -m model.gguf -t 2 --parallel 16 --port 8101

Each `--server NAME -- COMMAND...` group ends at the next `--server`; the command must listen on the port
its `--port` flag names, on 127.0.0.1. Servers run one at a time, so they never compete for the cores.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time

import httpx
import psutil

from pagedserve.bench.datasets import random_prompts
from pagedserve.bench.serve import first_served_model, run_load, summarize
from pagedserve.loader.source import resolve_model
from pagedserve.loader.tokenizer import load_tokenizer


def parse_servers(argv: list[str]) -> tuple[list[str], list[tuple[str, list[str]]]]:
    """Split `[options] --server NAME -- CMD... --server NAME -- CMD...`."""
    options, servers, i = [], [], 0
    while i < len(argv):
        if argv[i] == "--server":
            name, rest = argv[i + 1], argv[i + 2:]
            if not rest or rest[0] != "--":
                raise SystemExit(f"--server {name} must be followed by -- COMMAND")
            end = rest.index("--server") if "--server" in rest else len(rest)
            servers.append((name, rest[1:end]))
            i += 2 + end
        else:
            options.append(argv[i])
            i += 1
    return options, servers


class MemorySampler(threading.Thread):
    """Peak resident memory of a process and all its children (vLLM runs its engine in a child)."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.process = psutil.Process(pid)
        self.peak = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.5):
            try:
                tree = [self.process, *self.process.children(recursive=True)]
                self.peak = max(self.peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass


def wait_ready(base_url: str, process: subprocess.Popen, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode} before it was ready")
        try:
            if httpx.get(base_url + "/health", timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"not ready after {timeout:.0f} s")


def bench_one(name: str, command: list[str], args: argparse.Namespace, tokenizer) -> dict:
    port = int(re.search(r"--port[= ](\d+)", " ".join(command))[1])
    base_url = f"http://127.0.0.1:{port}"
    log = open(os.path.join(args.log_dir, f"{name}.log"), "w")
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    sampler = MemorySampler(process.pid)
    sampler.start()
    row: dict = {"name": name, "command": " ".join(command)}
    try:
        row["ready_s"] = wait_ready(base_url, process, args.ready_timeout)
        model = first_served_model(base_url, None)
        for concurrency in args.concurrency:
            num_prompts = max(args.min_prompts, concurrency * args.waves)
            prompts = random_prompts(tokenizer, num_prompts, args.input_len, args.output_len,
                                     seed=args.seed + concurrency)
            print(f"== {name}: concurrency {concurrency}, {num_prompts} prompts, load {os.getloadavg()[0]:.2f}",
                  flush=True)
            results, duration = asyncio.run(run_load(base_url, model, prompts, concurrency, float("inf"),
                                                     True, None, args.seed))
            report = summarize(results, duration, concurrency, float("inf"))
            row[concurrency] = {key: report[key] for key in ("completed", "failed", "output_throughput",
                                                             "median_ttft_ms", "median_tpot_ms", "median_itl_ms",
                                                             "errors")}
            print(json.dumps(row[concurrency]), flush=True)
        row["peak_rss_gib"] = sampler.peak / 2**30
    finally:
        sampler.stopped.set()
        os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        log.close()
        time.sleep(3)   # let the cores go quiet before the next server
    print(f"   {name}: ready after {row.get('ready_s', float('nan')):.1f} s, peak RSS "
          f"{sampler.peak / 2**30:.2f} GiB (started {time.monotonic() - started:.0f} s ago)", flush=True)
    return row


def table(rows: list[dict], concurrencies: list[int]) -> str:
    header = ["system", *[f"conc {c} tok/s" for c in concurrencies], *[f"TTFT med @{c} (ms)" for c in concurrencies],
              *[f"TPOT med @{c} (ms)" for c in concurrencies], "ready (s)", "peak RSS (GiB)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["name"]]
        cells += [f"{row[c]['output_throughput']:.1f}" if c in row else "–" for c in concurrencies]
        cells += [f"{row[c]['median_ttft_ms']:.0f}" if c in row else "–" for c in concurrencies]
        cells += [f"{row[c]['median_tpot_ms']:.1f}" if c in row else "–" for c in concurrencies]
        cells += [f"{row['ready_s']:.1f}" if "ready_s" in row else "–",
                  f"{row['peak_rss_gib']:.2f}" if "peak_rss_gib" in row else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    options, servers = parse_servers(sys.argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", default="smollm2-135m-instruct")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--waves", type=int, default=2, help="prompts per concurrency slot")
    parser.add_argument("--min-prompts", type=int, default=8)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ready-timeout", type=float, default=300)
    parser.add_argument("--log-dir", default=".")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args(options)
    if not servers:
        parser.error("give at least one --server NAME -- COMMAND")
    tokenizer = load_tokenizer(resolve_model(args.tokenizer))
    rows = []
    for name, command in servers:
        try:
            rows.append(bench_one(name, command, args, tokenizer))
        except RuntimeError as error:
            print(f"   {name}: {error}", flush=True)
            rows.append({"name": name, "error": str(error)})
    print(f"\n{args.input_len} prompt / {args.output_len} output tokens, streaming, closed loop, "
          f"{os.cpu_count()} CPUs\n")
    print(table(rows, args.concurrency))
    if args.output_json:
        with open(args.output_json, "w") as file:
            json.dump(rows, file, indent=2)


if __name__ == "__main__":
    main()
