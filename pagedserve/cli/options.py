"""Options from flags and `--config FILE` into the frozen configs, in one direction: flags -> options -> config."""
from __future__ import annotations

import argparse
import logging
import os
from typing import Any, Mapping

from pagedserve.cli.flags import add_accepted_flags, add_dataclass_flags, coerce_file_options, load_config_file, pick
from pagedserve.cli.vllm_flags import vllm_accepted_flags
from pagedserve.config import EngineConfig, ServerConfig
from pagedserve.config.environment import OLLAMA_DEFAULT_PORT, VARIABLES_BY_OPTION, environment_options

logger = logging.getLogger("pagedserve")

# vLLM flags that have no effect on this engine; accepted so pasted command lines work.
ACCEPTED_FLAGS: dict[str, tuple[type, str]] = {
    "swap_space": (float, "preempted sequences are recomputed, not swapped"),
    "cpu_offload_gb": (float, "weights are not offloaded"),
    "kv_cache_dtype": (str, "the KV cache uses the compute dtype"),
    "trust_remote_code": (bool, "only built-in architectures are supported, no remote code runs"),
    "load_format": (str, "the format is detected from the files"),
    "tokenizer_mode": (str, "the fast tokenizer is always used"),
    "max_seq_len_to_capture": (int, "no CUDA graphs are captured"),
    "worker_use_ray": (bool, "use --distributed-executor-backend ray"),
    "enable_chunked_prefill": (bool, "chunked prefill is always on"),
    "use_v2_block_manager": (bool, "there is one block manager"),
    "guided_decoding_backend": (str, "structured output always uses xgrammar"),
    "enable_log_requests": (bool, "requests are logged unless --disable-log-requests is given"),
    "enable_prompt_tokens_details": (bool, "usage reports cached prompt tokens whenever there are some"),
    "disable_frontend_multiprocessing": (bool, "the server and the engine share one process"),
    "max_logprobs": (int, "up to 20 logprobs per token are returned"),
    "max_parallel_loading_workers": (int, "weights load in one process"),
    "num_scheduler_steps": (int, "the engine schedules every step"),
    "chat_template_content_format": (str, "message content parts are joined into text"),
}

# The rest of vLLM 0.32's serve flags (cli/vllm_flags.py), `serve` only: (kind, reason).
VLLM_ACCEPTED_FLAGS = vllm_accepted_flags()

# Not options: what argparse adds for the subcommand itself.
_NOT_OPTIONS = ("command", "func", "config", "model_positional", "model_flags")
# Options of `serve` that are not config fields: --ollama picks Ollama's port when no other is set.
_SERVE_OPTIONS = ("ollama",)


def gather_options(args: argparse.Namespace, environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """Options from the environment (config/environment.py), overlaid with `--config FILE`, overlaid with
    the flags given: the command line wins. `environment_sources` names the variable behind each option
    the environment decided."""
    environment = environment_options(environ)
    options: dict[str, Any] = dict(environment.values)
    overridden: set[str] = set()
    if getattr(args, "config", None):
        from_file = load_config_file(args.config)
        known = {*pick(from_file, EngineConfig), *pick(from_file, ServerConfig), *ACCEPTED_FLAGS,
                 *VLLM_ACCEPTED_FLAGS, *_SERVE_OPTIONS}
        for name in sorted(set(from_file) - known):
            logger.warning("config file %s: unknown option %r ignored", args.config, name)
        options.update(coerce_file_options(from_file, EngineConfig))
        options.update(coerce_file_options(from_file, ServerConfig))
        options.update({name: value for name, value in from_file.items()
                        if name in ACCEPTED_FLAGS or name in VLLM_ACCEPTED_FLAGS or name in _SERVE_OPTIONS})
        overridden.update(from_file)
    flags = {name: value for name, value in vars(args).items() if name not in _NOT_OPTIONS}
    options.update(flags)
    overridden.update(flags)
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
    options["environment_sources"] = {option: variable for option, variable in environment.sources.items()
                                      if option not in overridden}
    return options


def environment_line(options: dict[str, Any]) -> str | None:
    """The start-up log line naming the variables the configs took values from (never their values)."""
    sources: dict[str, str] = options.get("environment_sources", {})
    if not sources:
        return None
    by_variable: dict[str, list[str]] = {}
    for option, variable in sources.items():
        by_variable.setdefault(variable, []).append(option)
    return "from the environment: " + ", ".join(f"{variable} ({', '.join(names)})"
                                                for variable, names in by_variable.items())


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
    real = {*pick(options, EngineConfig), *pick(options, ServerConfig)}
    for name, (_kind, reason) in {**ACCEPTED_FLAGS, **VLLM_ACCEPTED_FLAGS}.items():
        if name in options and name not in real:
            logger.info("--%s has no effect here: %s", name.replace("_", "-"), reason)
    for line in _inapplicable_engine_options(options, config):
        logger.info("%s", line)
    return config


def server_config_from_options(options: dict[str, Any]) -> ServerConfig:
    values = pick(options, ServerConfig)
    if options.get("ollama") and "port" not in values:
        values["port"] = OLLAMA_DEFAULT_PORT   # where Ollama's clients look when told nothing
    return ServerConfig(**values)


def _inapplicable_engine_options(options: dict[str, Any], config: EngineConfig) -> list[str]:
    """One line per engine option the user set that this engine or device cannot honour."""
    lines = []
    if config.quantization not in (None, "awq", "gptq", "awq_marlin", "gptq_marlin", "compressed-tensors", "gguf"):
        lines.append(f"--quantization {config.quantization} has no effect here: weights are used as they are "
                     "stored (awq, gptq and compressed-tensors checkpoints load packed; a GGUF carries its own)")
    if "gpu_memory_utilization" in options and _runs_on_cpu(config):
        lines.append("--gpu-memory-utilization applies to CUDA only; on CPU the KV cache takes --kv-cache-space "
                     "GiB (default: 30% of free memory, at most 0.75 GiB)")
    return lines


def _runs_on_cpu(config: EngineConfig) -> bool:
    if config.device != "auto":
        return config.device == "cpu"
    import torch

    return not torch.cuda.is_available()


def add_engine_flags(parser: argparse.ArgumentParser, skip: tuple[str, ...] = (), with_accepted: bool = True) -> None:
    """The engine's flags; `with_accepted`: and ACCEPTED_FLAGS in their own section (serve adds that last,
    with the rest of vLLM's, see add_serve_accepted_flags)."""
    group = parser.add_argument_group("engine")
    add_dataclass_flags(group, EngineConfig, skip, VARIABLES_BY_OPTION)
    group.add_argument("--config", help="YAML or JSON file with any of these options (the command line wins over "
                                        "it, and it over the environment)")
    if with_accepted:
        add_accepted_flags(parser, _accepted_kinds(ACCEPTED_FLAGS), per_flag_reasons=True)


def add_serve_accepted_flags(parser: argparse.ArgumentParser) -> None:
    """Every vLLM 0.32 serve flag that is not a real one, after the real ones (a name that became real is skipped)."""
    from pagedserve.cli.vllm_flags import SHORT_ALIASES

    add_accepted_flags(parser, _accepted_kinds(ACCEPTED_FLAGS), per_flag_reasons=True)
    add_accepted_flags(parser, VLLM_ACCEPTED_FLAGS, SHORT_ALIASES)


def _accepted_kinds(flags: dict[str, tuple[type, str]]) -> dict[str, tuple[str, str]]:
    return {name: ("switch" if kind is bool else "value", reason) for name, (kind, reason) in flags.items()}
