"""Side-by-side serving comparison: start each server alone, time it to ready, load it at several
concurrencies with `pagedserve bench serve`'s client, sample its memory, stop it, print one table.

    python bench/compare.py --server pagedserve -- pagedserve serve --port 8100 --disable-log-requests \
                            --server llama-server -- /path/llama-server -m model.gguf -t 2 --parallel 16 --port 8101

Each `--server NAME -- COMMAND...` group ends at the next `--server`; the command must listen on the port
its `--port` flag names, on 127.0.0.1. Servers run one at a time, so they never compete for the cores.

Workloads (`--workloads`, default all): `random` prompts at each `--concurrency`; `long-prompt`, a
~1,500-token prompt per request at concurrency 1 (its TTFT is prefill alone); `shared-prefix`, a
1,000-token system prompt shared by 64 short chat questions at concurrency 16 (median TTFT: prefix caching).
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

from pagedserve.bench.datasets import DATASETS, make_prompts
from pagedserve.bench.report import summarize
from pagedserve.bench.serve import LoadConfig, first_served_model, run_load
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


def run_workload(base_url: str, model: str, args: argparse.Namespace, tokenizer, dataset: str, concurrency: int,
                 seed: int) -> dict:
    """One `bench serve` run of `dataset` at `concurrency`; the fields the table shows."""
    defaults = DATASETS[dataset]
    if dataset == "random":
        shape = {"num_prompts": max(args.min_prompts, concurrency * args.waves), "input_len": args.input_len,
                 "output_len": args.output_len}
    elif dataset == "long-prompt":
        shape = {"num_prompts": args.long_prompt_num_prompts, "input_len": args.long_prompt_len,
                 "output_len": defaults.output_len}
    else:
        shape = {"num_prompts": args.shared_prefix_num_prompts, "input_len": defaults.input_len,
                 "output_len": defaults.output_len, "prefix_len": args.shared_prefix_len}
    prompts = make_prompts(dataset, tokenizer, seed=seed, **shape)
    print(f"== {dataset}: concurrency {concurrency}, {len(prompts)} prompts, load {os.getloadavg()[0]:.2f}",
          flush=True)
    config = LoadConfig(base_url=base_url, model=model, endpoint=defaults.endpoint, max_concurrency=concurrency,
                        ignore_eos=True, seed=seed)
    results, duration = asyncio.run(run_load(config, prompts))
    report = summarize(results, duration, concurrency, float("inf"))
    fields = {key: report[key] for key in ("completed", "failed", "output_throughput", "median_ttft_ms",
                                           "mean_ttft_ms", "median_tpot_ms", "median_itl_ms", "total_input_tokens",
                                           "errors")}
    print(json.dumps(fields), flush=True)
    return fields


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
        # NOTE: each run has its own seed, so no server answers one from prompts it cached in another.
        if "random" in args.workloads:
            row["random"] = {concurrency: run_workload(base_url, model, args, tokenizer, "random", concurrency,
                                                       args.seed + concurrency) for concurrency in args.concurrency}
        if "long-prompt" in args.workloads:   # TTFT of one prompt alone: concurrency 1
            row["long-prompt"] = run_workload(base_url, model, args, tokenizer, "long-prompt", 1, args.seed + 1000)
        if "shared-prefix" in args.workloads:
            row["shared-prefix"] = run_workload(base_url, model, args, tokenizer, "shared-prefix",
                                                args.shared_prefix_concurrency, args.seed + 2000)
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


def table(rows: list[dict], args: argparse.Namespace) -> str:
    concurrencies = args.concurrency if "random" in args.workloads else []
    header = ["system", *[f"conc {c} tok/s" for c in concurrencies], *[f"TTFT med @{c} (ms)" for c in concurrencies],
              *[f"TPOT med @{c} (ms)" for c in concurrencies]]
    if "long-prompt" in args.workloads:
        header.append(f"TTFT {args.long_prompt_len}-tok prompt med (ms)")
    if "shared-prefix" in args.workloads:
        header.append(f"shared-prefix TTFT med @{args.shared_prefix_concurrency} (ms)")
    header += ["ready (s)", "peak RSS (GiB)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        random_runs = row.get("random", {})
        cells = [row["name"]]
        cells += [f"{random_runs[c]['output_throughput']:.1f}" if c in random_runs else "–" for c in concurrencies]
        cells += [f"{random_runs[c]['median_ttft_ms']:.0f}" if c in random_runs else "–" for c in concurrencies]
        cells += [f"{random_runs[c]['median_tpot_ms']:.1f}" if c in random_runs else "–" for c in concurrencies]
        for workload in ("long-prompt", "shared-prefix"):
            if workload in args.workloads:
                cells.append(f"{row[workload]['median_ttft_ms']:.0f}" if workload in row else "–")
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
    parser.add_argument("--workloads", nargs="+", choices=tuple(DATASETS), default=list(DATASETS),
                        help="random: at each --concurrency; long-prompt: at concurrency 1; shared-prefix: at "
                             "--shared-prefix-concurrency, on the chat endpoint")
    parser.add_argument("--long-prompt-len", type=int, default=DATASETS["long-prompt"].input_len)
    parser.add_argument("--long-prompt-num-prompts", type=int, default=4)
    parser.add_argument("--shared-prefix-len", type=int, default=DATASETS["shared-prefix"].prefix_len)
    parser.add_argument("--shared-prefix-num-prompts", type=int, default=DATASETS["shared-prefix"].num_prompts)
    parser.add_argument("--shared-prefix-concurrency", type=int, default=16)
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
    print(f"\nrandom: {args.input_len} prompt / {args.output_len} output tokens; long-prompt: "
          f"{args.long_prompt_len} / {DATASETS['long-prompt'].output_len}; shared-prefix: a {args.shared_prefix_len}-"
          f"token system prompt, {args.shared_prefix_num_prompts} questions of {DATASETS['shared-prefix'].input_len} "
          f"tokens; streaming, closed loop, {os.cpu_count()} CPUs\n")
    print(table(rows, args))
    if args.output_json:
        with open(args.output_json, "w") as file:
            json.dump(rows, file, indent=2)


if __name__ == "__main__":
    main()
