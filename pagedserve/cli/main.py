"""The `pagedserve` command: serve, generate, and friends."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Mapping

from pagedserve.cli.bench import add_bench_parser
from pagedserve.cli.chat import add_chat_parser
from pagedserve.cli.flags import add_dataclass_flags
from pagedserve.cli.models import add_model_commands
from pagedserve.cli.pull import add_pull_commands
from pagedserve.cli.options import (add_engine_flags, add_serve_accepted_flags, engine_config_from_options,
                                    environment_line, gather_options, serve_model_names, server_config_from_options)
from pagedserve.config import EngineConfig, ServerConfig
from pagedserve.config.environment import ENVIRONMENT, VARIABLES_BY_OPTION
from pagedserve.sampling_params import SamplingParams

logger = logging.getLogger("pagedserve")

def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(format="%(levelname)s %(asctime)s %(name)s: %(message)s", datefmt="%m-%d %H:%M:%S")
    logging.getLogger().setLevel(getattr(logging, level.upper(), logging.INFO))


def serve_configs(argv: list[str], environ: Mapping[str, str] = os.environ) -> tuple[EngineConfig, ServerConfig]:
    """The configs `pagedserve serve ...` would run with (`argv` without the program name)."""
    args = build_parser().parse_args(argv)
    options = gather_options(args, environ)
    return engine_config_from_options(options), server_config_from_options(options)


def _generate(args: argparse.Namespace) -> int:
    from pagedserve.engine.llm import LLM

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
    server_config = server_config_from_options(options)
    setup_logging(server_config.log_level)
    if line := environment_line(options):
        logger.info("%s", line)
    engine_config = engine_config_from_options(options)
    from pagedserve.server.runner import run_server

    return run_server(server_config, engine_config, serve_model_names(options))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedserve", description="Serve and run LLMs with a paged KV cache.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="serve models over OpenAI- and Ollama-compatible HTTP APIs",
                                usage="pagedserve serve [MODEL ...] [options]", epilog=_environment_help(),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_serve_arguments(serve)
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

    add_bench_parser(commands, add_engine_flags)
    add_chat_parser(commands, add_engine_flags)
    add_model_commands(commands, add_engine_flags)
    add_pull_commands(commands)
    return parser


def add_serve_arguments(serve: argparse.ArgumentParser) -> None:
    """`pagedserve serve`'s arguments (also python -m pagedserve.entrypoints.openai.api_server's)."""
    serve.add_argument("model_positional", nargs="*", metavar="MODEL",
                       help="alias, created model, Hugging Face folder or repo id (org/name, org/name:Q4_K_M, "
                            "hf.co/org/name:Q4_K_M, modelscope:org/name), .gguf file or URL (same as --model); "
                            "several are served side by side, each under its own name; a hub model is downloaded "
                            "on first use")
    serve.add_argument("--model", "--model-path", "--model_path", action="append", dest="model_flags",
                       metavar="MODEL", default=argparse.SUPPRESS,
                       help="a model to serve (repeatable; --model-path is SGLang's spelling)")
    add_engine_flags(serve, skip=("model",), with_accepted=False)
    server = serve.add_argument_group("server")
    add_dataclass_flags(server, ServerConfig, environment=VARIABLES_BY_OPTION)
    server.add_argument("--ollama", action="store_true", default=argparse.SUPPRESS,
                        help="listen where Ollama's clients look when told nothing: 127.0.0.1:11434 (a --port, "
                             "PAGEDSERVE_PORT or OLLAMA_HOST still wins)")
    add_serve_accepted_flags(serve)


def _environment_help() -> str:
    lines = ["environment (read once at start-up; a --config file and then the command line win over it):"]
    for variable in ENVIRONMENT:
        backs = ", ".join("--" + option.replace("_", "-") for option in variable.options) or variable.read_by
        lines.append(f"  {variable.name:<26} {backs}: {variable.help}")
    return "\n".join(lines)


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
