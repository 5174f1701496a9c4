"""The `pagedserve` command: serve, generate, and friends."""
from __future__ import annotations

import argparse
import logging
import sys
from typing import Any

from pagedserve.cli_args import add_accepted_flags, add_dataclass_flags, coerce_file_options, load_config_file, pick
from pagedserve.config import EngineConfig
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
    "disable_log_requests": (bool, "requests are not logged one by one"),
    "enable_chunked_prefill": (bool, "chunked prefill is always on"),
    "use_v2_block_manager": (bool, "there is one block manager"),
    "guided_decoding_backend": (str, "structured output is not supported yet"),
}


def setup_logging(level: str = "INFO") -> None:
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO),
                        format="%(levelname)s %(asctime)s %(name)s: %(message)s", datefmt="%m-%d %H:%M:%S")


def engine_config_from_args(args: argparse.Namespace) -> EngineConfig:
    """EngineConfig from `--config FILE` overlaid with the flags given; logs flags that do nothing here."""
    options: dict[str, Any] = {}
    if getattr(args, "config", None):
        options.update(coerce_file_options(load_config_file(args.config), EngineConfig))
    options.update(pick(vars(args), EngineConfig))
    if getattr(args, "model_positional", None):
        options["model"] = args.model_positional
    for name, (_kind, reason) in ACCEPTED_FLAGS.items():
        if name in vars(args):
            logger.info("--%s has no effect here: %s", name.replace("_", "-"), reason)
    return EngineConfig(**options)


def add_engine_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("engine")
    add_dataclass_flags(group, EngineConfig)
    add_accepted_flags(group, ACCEPTED_FLAGS)
    group.add_argument("--config", help="YAML or JSON file with any of these options")


def _generate(args: argparse.Namespace) -> int:
    from pagedserve.engine.llm_engine import LLM

    config = engine_config_from_args(args)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedserve", description="Serve and run LLMs with a paged KV cache.")
    commands = parser.add_subparsers(dest="command", required=True)

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
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(getattr(args, "log_level", "INFO"))
    try:
        sys.exit(args.func(args))
    except ValueError as error:
        logger.error("%s", error)
        sys.exit(2)
