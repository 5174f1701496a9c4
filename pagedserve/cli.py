"""The `pagedserve` command: serve, generate, and friends."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any, Mapping

from pagedserve.cli_args import add_accepted_flags, add_dataclass_flags, coerce_file_options, load_config_file, pick
from pagedserve.config import EngineConfig, ServerConfig
from pagedserve.sampling_params import SamplingParams

logger = logging.getLogger("pagedserve")

# vLLM flags that have no effect on this engine; accepted so pasted command lines work.
ACCEPTED_FLAGS: dict[str, tuple[type, str]] = {
    "swap_space": (float, "preempted sequences are recomputed, not swapped"),
    "cpu_offload_gb": (float, "weights are not offloaded"),
    "kv_cache_dtype": (str, "the KV cache uses the compute dtype"),
    "trust_remote_code": (bool, "only built-in architectures are supported, no remote code runs"),
    "load_format": (str, "the format is detected from the files"),
    "tokenizer_mode": (str, "the fast tokenizer is always used"),
    "disable_custom_all_reduce": (bool, "there is no custom all-reduce"),
    "max_seq_len_to_capture": (int, "no CUDA graphs are captured"),
    "distributed_executor_backend": (str, "one process serves the model"),
    "worker_use_ray": (bool, "one process serves the model"),
    "enable_chunked_prefill": (bool, "chunked prefill is always on"),
    "use_v2_block_manager": (bool, "there is one block manager"),
    "guided_decoding_backend": (str, "structured output is not supported yet"),
    "enable_log_requests": (bool, "requests are logged unless --disable-log-requests is given"),
    "enable_auto_tool_choice": (bool, "tool calls are not parsed yet; the model's text is returned as content"),
    "tool_call_parser": (str, "tool calls are not parsed yet; the model's text is returned as content"),
    "trust_request_chat_template": (bool, "chat templates in requests are always accepted (rendered sandboxed)"),
    "enable_prompt_tokens_details": (bool, "usage reports cached prompt tokens whenever there are some"),
    "disable_frontend_multiprocessing": (bool, "the server and the engine share one process"),
    "max_logprobs": (int, "up to 20 logprobs per token are returned"),
    "max_parallel_loading_workers": (int, "weights load in one process"),
    "num_scheduler_steps": (int, "the engine schedules every step"),
    "chat_template_content_format": (str, "message content parts are joined into text"),
}

# Not options: what argparse adds for the subcommand itself.
_NOT_OPTIONS = ("command", "func", "config", "model_positional", "model_flags")


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(levelname)s %(asctime)s %(name)s: %(message)s", datefmt="%m-%d %H:%M:%S")


def gather_options(args: argparse.Namespace) -> dict[str, Any]:
    """Options from `--config FILE` overlaid with the flags given (the command line wins)."""
    options: dict[str, Any] = {}
    if getattr(args, "config", None):
        from_file = load_config_file(args.config)
        known = {*pick(from_file, EngineConfig), *pick(from_file, ServerConfig), *ACCEPTED_FLAGS}
        for name in sorted(set(from_file) - known):
            logger.warning("config file %s: unknown option %r ignored", args.config, name)
        options.update(coerce_file_options(from_file, EngineConfig))
        options.update(coerce_file_options(from_file, ServerConfig))
        options.update({name: value for name, value in from_file.items() if name in ACCEPTED_FLAGS})
    options.update({name: value for name, value in vars(args).items() if name not in _NOT_OPTIONS})
    positional = getattr(args, "model_positional", None) or []
    flagged = getattr(args, "model_flags", None) or ([args.model] if "model" in vars(args) else [])
    if isinstance(positional, str):
        positional = [positional]
    if positional and flagged and positional != flagged:
        raise ValueError(f"the model is given twice, as {' '.join(positional)!r} and as --model "
                         f"{' '.join(flagged)!r}")
    names = positional or flagged
    if names:
        options["model"], options["models"] = names[0], names
    return options


def serve_model_names(options: dict[str, Any]) -> list[str] | None:
    """The models `serve` was told to serve; [] for only a models directory's, None for the default model."""
    if "models" in options:
        return options["models"]
    if "model" in options:
        return [options["model"]]
    return [] if options.get("models_dir") else None


def engine_config_from_options(options: dict[str, Any]) -> EngineConfig:
    """EngineConfig from gathered options; logs once for each option that cannot apply here."""
    config = EngineConfig(**pick(options, EngineConfig))
    for name, (_kind, reason) in ACCEPTED_FLAGS.items():
        if name in options:
            logger.info("--%s has no effect here: %s", name.replace("_", "-"), reason)
    for line in _inapplicable_engine_options(options, config):
        logger.info("%s", line)
    return config


def server_config_from_options(options: dict[str, Any], environ: Mapping[str, str] = os.environ) -> ServerConfig:
    values = pick(options, ServerConfig)
    if not values.get("api_key"):
        key = environ.get("PAGEDSERVE_API_KEY") or environ.get("VLLM_API_KEY")
        if key:
            values["api_key"] = (key,)
    return ServerConfig(**values)


def serve_configs(argv: list[str], environ: Mapping[str, str] = os.environ) -> tuple[EngineConfig, ServerConfig]:
    """The configs `pagedserve serve ...` would run with (`argv` without the program name)."""
    args = build_parser().parse_args(argv)
    options = gather_options(args)
    return engine_config_from_options(options), server_config_from_options(options, environ)


def _inapplicable_engine_options(options: dict[str, Any], config: EngineConfig) -> list[str]:
    """One line per engine option the user set that this engine or device cannot honour."""
    lines = []
    if config.tensor_parallel_size > 1:
        lines.append(f"--tensor-parallel-size {config.tensor_parallel_size}: the model runs in 1 process; "
                     "tensor parallelism is not supported yet")
    if config.pipeline_parallel_size > 1:
        lines.append(f"--pipeline-parallel-size {config.pipeline_parallel_size}: the model runs in 1 process; "
                     "pipeline parallelism is not supported yet")
    if config.quantization is not None:
        lines.append(f"--quantization {config.quantization} has no effect here: weights are used as they are "
                     "stored (a GGUF file carries its own quantization)")
    if "gpu_memory_utilization" in options and _runs_on_cpu(config):
        lines.append("--gpu-memory-utilization applies to CUDA only; on CPU the KV cache takes --kv-cache-space "
                     "GiB (default: 30% of free memory, at most 0.75 GiB)")
    return lines


def _runs_on_cpu(config: EngineConfig) -> bool:
    if config.device != "auto":
        return config.device == "cpu"
    import torch

    return not torch.cuda.is_available()


def add_engine_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    group = parser.add_argument_group("engine")
    add_dataclass_flags(group, EngineConfig, skip)
    add_accepted_flags(group, ACCEPTED_FLAGS)
    group.add_argument("--config", help="YAML or JSON file with any of these options")


def _generate(args: argparse.Namespace) -> int:
    from pagedserve.engine.llm_engine import LLM

    config = engine_config_from_options(gather_options(args))
    llm = LLM(**vars(config))
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, max_tokens=args.max_tokens,
                            seed=args.sample_seed, n=args.n)
    if args.chat:
        outputs = llm.chat([[{"role": "user", "content": p}] for p in args.prompt], params)
    else:
        outputs = llm.generate(args.prompt, params)
    for output in outputs:
        for completion in output.outputs:
            print(completion.text if args.chat else output.prompt + completion.text)
            if len(output.outputs) > 1 or len(outputs) > 1:
                print("-" * 40)
    return 0


def _serve(args: argparse.Namespace) -> int:
    options = gather_options(args)
    engine_config = engine_config_from_options(options)
    server_config = server_config_from_options(options)
    from pagedserve.server.runner import run_server

    return run_server(server_config, engine_config, serve_model_names(options))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedserve", description="Serve and run LLMs with a paged KV cache.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve models over OpenAI- and Ollama-compatible HTTP APIs")
    serve.add_argument("model_positional", nargs="*", metavar="MODEL",
                       help="alias, created model, Hugging Face folder or repo id, or .gguf file (same as --model); "
                            "several are served side by side, each under its own name")
    serve.add_argument("--model", action="append", dest="model_flags", metavar="MODEL", default=argparse.SUPPRESS,
                       help="a model to serve (repeatable)")
    add_engine_flags(serve, skip=("model",))
    add_dataclass_flags(serve.add_argument_group("server"), ServerConfig)
    serve.set_defaults(func=_serve)

    generate = commands.add_parser("generate", help="complete prompts offline and print the results")
    generate.add_argument("--prompt", "-p", action="append", required=True, help="prompt text (repeatable)")
    generate.add_argument("--max-tokens", "--max_tokens", dest="max_tokens", type=int, default=128)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--top-p", "--top_p", dest="top_p", type=float, default=1.0)
    generate.add_argument("--sample-seed", "--sample_seed", dest="sample_seed", type=int, default=None,
                          help="sampling seed of the request")
    generate.add_argument("-n", type=int, default=1, help="completions per prompt")
    generate.add_argument("--chat", action="store_true", help="send each prompt as a user chat message")
    add_engine_flags(generate)
    generate.set_defaults(func=_generate)

    from pagedserve.bench import add_bench_parser
    from pagedserve.cli_models import add_model_commands
    from pagedserve.terminal_chat import add_chat_parser

    add_bench_parser(commands, add_engine_flags)
    add_chat_parser(commands, add_engine_flags)
    add_model_commands(commands, add_engine_flags)
    return parser


def apply_omp_wait_policy(args: argparse.Namespace) -> None:
    """Set OMP_WAIT_POLICY from --omp-wait-policy ("auto" leaves the environment alone). OpenMP reads
    it once, when torch loads it, so this runs before anything imports torch."""
    if "omp_wait_policy" not in vars(args):
        return
    policy = gather_options(args).get("omp_wait_policy", "auto")
    if policy != "auto":
        os.environ["OMP_WAIT_POLICY"] = str(policy).upper()


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "log_level", "INFO"))
    try:
        apply_omp_wait_policy(args)
        sys.exit(args.func(args))
    except ValueError as error:
        logger.error("%s", error)
        sys.exit(2)
