"""`pagedserve bench serve | throughput | latency | embed`: the command-line parts of the benchmarks (not tests)."""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
from pathlib import Path
from typing import Any

from pagedserve.bench.datasets import DATASETS
from pagedserve.config import DEFAULT_MODEL

logger = logging.getLogger(__name__)

_OFFLINE_DATASETS = ("random", "long-prompt")   # token ids only: no system message offline
_BACKEND_ENDPOINTS = {"vllm": "/v1/completions", "openai": "/v1/completions", "openai-chat": "/v1/chat/completions"}


def add_bench_parser(commands: argparse._SubParsersAction, add_engine_flags) -> None:
    bench = commands.add_parser("bench", help="benchmark a server or the engine")
    kinds = bench.add_subparsers(dest="bench_command", required=True)

    serve = kinds.add_parser("serve", help="load-test an OpenAI-compatible server over HTTP")
    serve.add_argument("--base-url", "--base_url", dest="base_url", default="http://127.0.0.1:8000")
    serve.add_argument("--endpoint", default=None,
                       help="/v1/completions or /v1/chat/completions (default: the backend's, else the dataset's: "
                            "shared-prefix chat, the others completions)")
    serve.add_argument("--backend", choices=("vllm", "openai", "openai-chat"), default=None,
                       help="vLLM's spelling of the API: openai-chat sends to /v1/chat/completions, vllm and openai to "
                            "/v1/completions (--endpoint wins)")
    serve.add_argument("--model", default=None, help="model name to request (default: the server's first)")
    serve.add_argument("--tokenizer", default=None,
                       help="tokenizer for building prompts (default: --model if it resolves, else the default model)")
    serve.add_argument("--api-key", "--api_key", dest="api_key", default=None)
    serve.add_argument("--max-concurrency", "--max_concurrency", dest="max_concurrency", type=int, default=1)
    serve.add_argument("--request-rate", "--request_rate", dest="request_rate", type=float, default=float("inf"),
                       help="requests per second (Poisson arrivals); default: all at once, closed loop")
    serve.add_argument("--json-schema-path", "--json-schema", "--json_schema_path", dest="json_schema_path",
                       default=None, help="a JSON schema file sent with the requests: response_format json_schema "
                                          "on chat, structured_outputs.json on completions")
    serve.add_argument("--structured-output-ratio", "--structured_output_ratio", dest="structured_output_ratio",
                       type=float, default=1.0, help="share of the requests that carry the schema (default 1.0)")
    serve.add_argument("--save-result", "--save_result", dest="save_result", default=None, help="write JSON here")
    _add_dataset_flags(serve, tuple(DATASETS))
    serve.set_defaults(func=_run_serve)

    for name, help_text in (("throughput", "offline throughput of the engine (or transformers)"),
                            ("latency", "end-to-end latency of one batch, and its decode speed")):
        parser = kinds.add_parser(name, help=help_text)
        _add_dataset_flags(parser, _OFFLINE_DATASETS, with_seed=False)   # the engine's --seed seeds the prompts
        parser.add_argument("--backend", choices=("pagedserve", "hf"), default="pagedserve",
                            help="hf: the same prompts through transformers' generate on the same weights")
        if name == "throughput":
            parser.add_argument("--hf-batch-size", "--hf_batch_size", dest="hf_batch_size", type=int, default=16)
        else:
            parser.add_argument("--iterations", type=int, default=3)
        parser.add_argument("--output-json", "--output_json", dest="output_json", default=None)
        add_engine_flags(parser)
        parser.set_defaults(func=_run_offline)

    embed = kinds.add_parser("embed", help="embeddings per second of the engine (or sentence-transformers)")
    embed.add_argument("--backend", choices=("pagedserve", "st"), default="pagedserve",
                       help="st: the same texts through sentence-transformers' encode on the same model folder")
    embed.add_argument("--num-prompts", "--num_prompts", dest="num_prompts", type=int, default=256)
    embed.add_argument("--input-len", "--input_len", dest="input_len", type=int, default=64,
                       help="tokens per text (random tokens, as the other datasets)")
    embed.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=32,
                       help="texts per encode call for st (its default); the engine batches by its token budget")
    embed.add_argument("--iterations", type=int, default=3)
    embed.add_argument("--output-json", "--output_json", dest="output_json", default=None)
    add_engine_flags(embed)
    embed.set_defaults(func=_run_embed)


def _add_dataset_flags(parser: argparse.ArgumentParser, datasets: tuple[str, ...], with_seed: bool = True) -> None:
    parser.add_argument("--dataset", "--dataset-name", "--dataset_name", dest="dataset", choices=datasets,
                        default="random", help="random, long-prompt (~1,500-token prompts, short answers), "
                                               "shared-prefix (a 1,000-token system prompt, 64 short questions)")
    # None: the dataset's default (pagedserve/bench/datasets.py DATASETS)
    parser.add_argument("--input-len", "--input_len", "--random-input-len", "--prefix-repetition-suffix-len",
                        dest="input_len", type=int, default=None,
                        help="prompt tokens (shared-prefix: the question after the prefix)")
    parser.add_argument("--output-len", "--output_len", "--random-output-len", "--prefix-repetition-output-len",
                        dest="output_len", type=int, default=None)
    parser.add_argument("--num-prompts", "--num_prompts", dest="num_prompts", type=int, default=None)
    if "shared-prefix" in datasets:
        parser.add_argument("--prefix-len", "--prefix_len", "--prefix-repetition-prefix-len", dest="prefix_len",
                            type=int, default=None, help="shared-prefix: tokens of the shared system prompt")
    parser.add_argument("--ignore-eos", "--ignore_eos", dest="ignore_eos", action="store_true")
    if with_seed:
        parser.add_argument("--seed", type=int, default=0, help="prompt seed: another seed, other prompts")


def _dataset_shape(args: argparse.Namespace) -> dict[str, Any]:
    """num_prompts, input_len, output_len and prefix_len: the flags given, else the dataset's defaults."""
    defaults = DATASETS[args.dataset]
    return {name: getattr(args, name, None) if getattr(args, name, None) is not None else getattr(defaults, name)
            for name in ("num_prompts", "input_len", "output_len", "prefix_len")}


def _endpoint_for(args: argparse.Namespace) -> str:
    """--endpoint, else the one --backend names, else the dataset's."""
    return args.endpoint or _BACKEND_ENDPOINTS.get(args.backend) or DATASETS[args.dataset].endpoint


def _tokenizer_for(name: str | None):
    from pagedserve.loader.source import resolve_model
    from pagedserve.loader.tokenizer import load_tokenizer

    try:
        source = resolve_model(name or DEFAULT_MODEL)
    except ValueError:
        logger.warning("cannot load a tokenizer for %r; building prompts with %s's", name, DEFAULT_MODEL)
        source = resolve_model(DEFAULT_MODEL)
    return load_tokenizer(source)


def _read_schema(path: str | None) -> dict[str, Any] | None:
    if path is None:
        return None
    import jsonschema

    try:
        schema = json.loads(Path(path).read_text())
        jsonschema.Draft202012Validator.check_schema(schema)
    except (OSError, ValueError, jsonschema.SchemaError) as error:
        raise SystemExit(f"--json-schema-path {path}: {error}") from None
    return schema


def _run_serve(args: argparse.Namespace) -> int:
    from pagedserve.bench.datasets import make_prompts
    from pagedserve.bench.report import format_report, save_report, summarize
    from pagedserve.bench.serve import LoadConfig, first_served_model, run_load

    shape = _dataset_shape(args)
    schema = _read_schema(args.json_schema_path)
    model = args.model or first_served_model(args.base_url, args.api_key)
    try:
        config = LoadConfig(base_url=args.base_url, model=model,
                            endpoint=_endpoint_for(args),
                            max_concurrency=args.max_concurrency, request_rate=args.request_rate,
                            ignore_eos=args.ignore_eos, api_key=args.api_key, seed=args.seed, json_schema=schema,
                            structured_output_ratio=args.structured_output_ratio)
    except ValueError as error:
        raise SystemExit(f"pagedserve bench serve: {error}") from None
    prompts = make_prompts(args.dataset, _tokenizer_for(args.tokenizer or args.model), seed=args.seed, **shape)
    results, duration = asyncio.run(run_load(config, prompts))
    report = summarize(results, duration, args.max_concurrency, args.request_rate, schema)
    print(format_report(report))
    if args.save_result:
        save_report(report, args.save_result, {"base_url": args.base_url, "model": model, "endpoint": config.endpoint,
                                                "dataset": args.dataset, **shape, "seed": args.seed,
                                                "json_schema_path": args.json_schema_path,
                                                "structured_output_ratio": args.structured_output_ratio
                                                if schema is not None else 0.0})
    return 0 if report["failed"] == 0 else 1


def _run_offline(args: argparse.Namespace) -> int:
    from pagedserve.bench.datasets import random_prompts
    from pagedserve.bench.offline import hf_latency, hf_throughput, pagedserve_latency, pagedserve_throughput
    from pagedserve.cli.options import engine_config_from_options, gather_options

    config = engine_config_from_options(gather_options(args))
    shape = _dataset_shape(args)
    tokenizer = _tokenizer_for(config.model)
    # NOTE: latency: every timed run gets prompts of its own, so none is answered from the prefix cache.
    num_sets = 1 + 2 * args.iterations if args.bench_command == "latency" else 1
    batches = [random_prompts(tokenizer, shape["num_prompts"], shape["input_len"], shape["output_len"],
                              config.seed + index) for index in range(num_sets)]
    if args.bench_command == "latency":
        report = (hf_latency if args.backend == "hf" else pagedserve_latency)(config, batches)
    elif args.backend == "hf":
        report = hf_throughput(config, batches[0], args.hf_batch_size)
    else:
        report = pagedserve_throughput(config, batches[0])
    _print_and_save(report, args.output_json)
    return 0


def _run_embed(args: argparse.Namespace) -> int:
    from pagedserve.bench.datasets import random_prompts
    from pagedserve.bench.embed import pagedserve_embed, st_embed
    from pagedserve.cli.options import engine_config_from_options, gather_options

    config = engine_config_from_options(gather_options(args))
    texts = [p.text for p in random_prompts(_tokenizer_for(config.model), args.num_prompts, args.input_len, 1,
                                            config.seed)]
    if args.backend == "st":
        report = st_embed(config, texts, args.batch_size, args.iterations)
    else:
        report = pagedserve_embed(config, texts, args.iterations)
    _print_and_save(report, args.output_json)
    return 0


def _print_and_save(report: dict[str, Any], path: str | None) -> None:
    print(json.dumps(report, indent=2))
    if path:
        with open(path, "w") as file:
            json.dump(report, file, indent=2)
