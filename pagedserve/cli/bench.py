"""`pagedserve bench serve | throughput | latency`: the command-line parts of the benchmarks (not tests)."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging

from pagedserve.config import DEFAULT_MODEL

logger = logging.getLogger(__name__)


def add_bench_parser(commands: argparse._SubParsersAction, add_engine_flags) -> None:
    bench = commands.add_parser("bench", help="benchmark a server or the engine")
    kinds = bench.add_subparsers(dest="bench_command", required=True)

    serve = kinds.add_parser("serve", help="load-test an OpenAI-compatible server over HTTP")
    serve.add_argument("--base-url", "--base_url", dest="base_url", default="http://127.0.0.1:8000")
    serve.add_argument("--model", default=None, help="model name to request (default: the server's first)")
    serve.add_argument("--tokenizer", default=None,
                       help="tokenizer for building prompts (default: --model if it resolves, else the default model)")
    serve.add_argument("--api-key", "--api_key", dest="api_key", default=None)
    serve.add_argument("--max-concurrency", "--max_concurrency", dest="max_concurrency", type=int, default=1)
    serve.add_argument("--request-rate", "--request_rate", dest="request_rate", type=float, default=float("inf"),
                       help="requests per second (Poisson arrivals); default: all at once, closed loop")
    serve.add_argument("--save-result", "--save_result", dest="save_result", default=None, help="write JSON here")
    _add_dataset_flags(serve)
    serve.set_defaults(func=_run_serve)

    for name, help_text in (("throughput", "offline throughput of the engine (or transformers)"),
                            ("latency", "end-to-end latency of one batch")):
        parser = kinds.add_parser(name, help=help_text)
        _add_dataset_flags(parser, with_seed=False)   # the engine's --seed also seeds the prompts
        if name == "throughput":
            parser.add_argument("--backend", choices=("pagedserve", "hf"), default="pagedserve")
            parser.add_argument("--hf-batch-size", "--hf_batch_size", dest="hf_batch_size", type=int, default=16)
        else:
            parser.add_argument("--iterations", type=int, default=3)
        parser.add_argument("--output-json", "--output_json", dest="output_json", default=None)
        add_engine_flags(parser)
        parser.set_defaults(func=_run_offline)


def _add_dataset_flags(parser: argparse.ArgumentParser, with_seed: bool = True) -> None:
    parser.add_argument("--dataset", "--dataset-name", "--dataset_name", dest="dataset", choices=("random",),
                        default="random")
    parser.add_argument("--input-len", "--input_len", "--random-input-len", dest="input_len", type=int, default=128)
    parser.add_argument("--output-len", "--output_len", "--random-output-len", dest="output_len", type=int,
                        default=128)
    parser.add_argument("--num-prompts", "--num_prompts", dest="num_prompts", type=int, default=32)
    parser.add_argument("--ignore-eos", "--ignore_eos", dest="ignore_eos", action="store_true")
    if with_seed:
        parser.add_argument("--seed", type=int, default=0, help="prompt seed: another seed, other prompts")


def _tokenizer_for(name: str | None):
    from pagedserve.loader.source import resolve_model
    from pagedserve.loader.tokenizer import load_tokenizer

    try:
        source = resolve_model(name or DEFAULT_MODEL)
    except ValueError:
        logger.warning("cannot load a tokenizer for %r; building prompts with %s's", name, DEFAULT_MODEL)
        source = resolve_model(DEFAULT_MODEL)
    return load_tokenizer(source)


def _run_serve(args: argparse.Namespace) -> int:
    from pagedserve.bench.datasets import random_prompts
    from pagedserve.bench.serve import first_served_model, format_report, run_load, save_report, summarize

    model = args.model or first_served_model(args.base_url, args.api_key)
    tokenizer = _tokenizer_for(args.tokenizer or args.model)
    prompts = random_prompts(tokenizer, args.num_prompts, args.input_len, args.output_len, args.seed)
    results, duration = asyncio.run(run_load(args.base_url, model, prompts, args.max_concurrency,
                                             args.request_rate, args.ignore_eos, args.api_key, args.seed))
    report = summarize(results, duration, args.max_concurrency, args.request_rate)
    print(format_report(report))
    if args.save_result:
        save_report(report, args.save_result, {"base_url": args.base_url, "model": model, "num_prompts":
                                                args.num_prompts, "input_len": args.input_len,
                                                "output_len": args.output_len, "seed": args.seed})
    return 0 if report["failed"] == 0 else 1


def _run_offline(args: argparse.Namespace) -> int:
    from pagedserve.bench.datasets import random_prompts
    from pagedserve.bench.offline import hf_throughput, pagedserve_latency, pagedserve_throughput
    from pagedserve.cli.options import engine_config_from_options, gather_options

    config = engine_config_from_options(gather_options(args))
    prompts = random_prompts(_tokenizer_for(config.model), args.num_prompts, args.input_len, args.output_len,
                             config.seed)
    if args.bench_command == "latency":
        report = pagedserve_latency(config, prompts, args.iterations)
    elif args.backend == "hf":
        report = hf_throughput(config, prompts, args.hf_batch_size)
    else:
        report = pagedserve_throughput(config, prompts)
    print(json.dumps(report, indent=2))
    if args.output_json:
        with open(args.output_json, "w") as file:
            json.dump(report, file, indent=2)
    return 0
