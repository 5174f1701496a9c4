"""The environment variables a deployment sets, read once at start-up into options (flags win over them).

Each audience keeps its own names: Ollama's service files set OLLAMA_*, vLLM's guides VLLM_*, containers
PAGEDSERVE_*. `environment_options(environ)` turns the ones that are set into option values, the same
names and types the flags produce; `cli/options.py` lays them under the command line and a --config file.
The HF_* variables are listed for `--help` only: huggingface_hub reads them itself, so downloads, the
cache and offline mode follow them as its documentation says.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Callable, Mapping

from pagedserve.config.duration import parse_duration

OLLAMA_DEFAULT_HOST = "127.0.0.1"
OLLAMA_DEFAULT_PORT = 11434
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")
_LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclass(frozen=True)
class EnvVar:
    """One variable: the options it sets (`parse` returns them) and what `--help` says of it."""

    name: str
    options: tuple[str, ...]                   # the config fields it backs; () if a library reads it itself
    parse: Callable[[str], dict[str, Any]] | None
    help: str
    read_by: str = "huggingface_hub"           # who reads it, when it backs no option


def _one(option: str, convert: Callable[[str], Any]) -> Callable[[str], dict[str, Any]]:
    return lambda text: {option: convert(text.strip())}


def _positive_int(name: str) -> Callable[[str], int]:
    def convert(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise ValueError(f"{name}={text!r}: expected a positive integer") from None
        if value < 1:
            raise ValueError(f"{name}={text!r}: expected a positive integer")
        return value
    return convert


def _boolean(name: str) -> Callable[[str], bool]:
    def convert(text: str) -> bool:
        lowered = text.lower()
        if lowered not in _TRUE + _FALSE:
            raise ValueError(f"{name}={text!r}: expected 1/true or 0/false")
        return lowered in _TRUE
    return convert


def _port(name: str) -> Callable[[str], int]:
    def convert(text: str) -> int:
        if not text.isdigit() or not 0 <= int(text) <= 65535:
            raise ValueError(f"{name}={text!r}: expected a port number in [0, 65535]")
        return int(text)
    return convert


_HOST_PORT = re.compile(r"^(?P<host>\[[^\]]*\]|[^:/\[\]]*)(?::(?P<port>[^/]*))?(?:/.*)?$")


def parse_ollama_host(text: str) -> dict[str, Any]:
    """OLLAMA_HOST as Ollama reads it: `host`, `host:port`, `:port`, `scheme://host[:port]`; the host
    defaults to 127.0.0.1 and the port to 11434 (80 or 443 after http:// or https://)."""
    value = text.strip()
    default_port = OLLAMA_DEFAULT_PORT
    scheme, separator, rest = value.partition("://")
    if separator:
        default_port = {"http": 80, "https": 443}.get(scheme.lower(), OLLAMA_DEFAULT_PORT)
        value = rest
    match = _HOST_PORT.match(value)
    if match is None:
        raise ValueError(f"OLLAMA_HOST={text!r}: expected host, host:port or http://host:port")
    host = match["host"].strip("[]") or OLLAMA_DEFAULT_HOST
    port = _port("OLLAMA_HOST")(match["port"]) if match["port"] else default_port
    return {"host": host, "port": port}


def _keep_alive(text: str) -> str:
    parse_duration(text)   # raises ValueError naming the bad value
    return text


def _origins(text: str) -> list[str]:
    return [origin.strip() for origin in text.split(",") if origin.strip()]


def _kv_cache_space(text: str) -> dict[str, Any]:
    """VLLM_CPU_KVCACHE_SPACE: GiB of KV cache on CPU; 0 means the default sizing, as in vLLM."""
    try:
        gib = float(text)
    except ValueError:
        raise ValueError(f"VLLM_CPU_KVCACHE_SPACE={text!r}: expected GiB, e.g. 4") from None
    if gib < 0:
        raise ValueError(f"VLLM_CPU_KVCACHE_SPACE={text!r}: expected GiB, e.g. 4")
    return {"kv_cache_space": gib} if gib > 0 else {}


def _log_stats_interval(text: str) -> dict[str, Any]:
    """VLLM_LOG_STATS_INTERVAL: seconds; vLLM falls back to 10 for a value that is not positive."""
    try:
        seconds = float(text)
    except ValueError:
        raise ValueError(f"VLLM_LOG_STATS_INTERVAL={text!r}: expected seconds, e.g. 10") from None
    return {"log_stats_interval": seconds if seconds > 0 else 10.0}


def _log_level(text: str) -> str:
    if text.lower() not in _LOG_LEVELS:
        raise ValueError(f"VLLM_LOGGING_LEVEL={text!r}: expected one of {', '.join(_LOG_LEVELS)}")
    return text.lower()


def _api_key(text: str) -> dict[str, Any]:
    return {"api_key": [text]} if text else {}


# NOTE: for an option several variables back, the first one set wins (PAGEDSERVE_* before the others).
ENVIRONMENT: tuple[EnvVar, ...] = (
    EnvVar("PAGEDSERVE_HOST", ("host",), _one("host", str), "address to listen on"),
    EnvVar("PAGEDSERVE_PORT", ("port",), _one("port", _port("PAGEDSERVE_PORT")), "port to listen on"),
    EnvVar("OLLAMA_HOST", ("host", "port"), parse_ollama_host,
           "address and port to listen on, as Ollama reads it (0.0.0.0, :11434, 0.0.0.0:11434, http://host:port)"),
    EnvVar("PAGEDSERVE_API_KEY", ("api_key",), _api_key, "the key clients must send"),
    EnvVar("VLLM_API_KEY", ("api_key",), _api_key, "the key clients must send"),
    EnvVar("OLLAMA_MODELS", ("models_dir",), _one("models_dir", str),
           "models directory; its models are served too, as Ollama serves every local model"),
    EnvVar("OLLAMA_KEEP_ALIVE", ("keep_alive",), _one("keep_alive", _keep_alive),
           "how long an idle model stays loaded (5m, 1h, 0, -1)"),
    EnvVar("OLLAMA_ORIGINS", ("allowed_origins",), _one("allowed_origins", _origins),
           "comma-separated CORS origins, e.g. *"),
    EnvVar("OLLAMA_NUM_PARALLEL", ("max_num_seqs",), _one("max_num_seqs", _positive_int("OLLAMA_NUM_PARALLEL")),
           "requests one model runs at once"),
    EnvVar("OLLAMA_MAX_QUEUE", ("max_waiting_requests",),
           _one("max_waiting_requests", _positive_int("OLLAMA_MAX_QUEUE")),
           "requests that may wait per model before new ones get 503"),
    EnvVar("OLLAMA_CONTEXT_LENGTH", ("max_model_len",),
           _one("max_model_len", _positive_int("OLLAMA_CONTEXT_LENGTH")), "context length"),
    EnvVar("OLLAMA_MAX_LOADED_MODELS", ("max_loaded_models",),
           _one("max_loaded_models", _positive_int("OLLAMA_MAX_LOADED_MODELS")), "models loaded at once"),
    EnvVar("VLLM_CPU_KVCACHE_SPACE", ("kv_cache_space",), _kv_cache_space, "KV cache GiB on CPU (0: default)"),
    EnvVar("VLLM_CPU_OMP_THREADS_BIND", ("cpu_threads_bind",), _one("cpu_threads_bind", str),
           "CPU cores the threads run on: auto, all/nobind, or a list like 0-3,8"),
    EnvVar("PAGEDSERVE_DISABLE_SHM_ALLREDUCE", ("disable_custom_all_reduce",),
           _one("disable_custom_all_reduce", _boolean("PAGEDSERVE_DISABLE_SHM_ALLREDUCE")),
           "1: tensor-parallel ranks on one machine all-reduce over gloo, not shared memory"),
    EnvVar("PAGEDSERVE_CPU_ISA", (), None,
           "CPU kernel variant: avx512, avx2 or native (default: the widest one this CPU runs)", "the kernels"),
    EnvVar("VLLM_LOGGING_LEVEL", ("log_level",), _one("log_level", _log_level), "log level"),
    EnvVar("PAGEDSERVE_USE_MODELSCOPE", ("use_modelscope",),
           _one("use_modelscope", _boolean("PAGEDSERVE_USE_MODELSCOPE")), "download from ModelScope"),
    EnvVar("VLLM_USE_MODELSCOPE", ("use_modelscope",), _one("use_modelscope", _boolean("VLLM_USE_MODELSCOPE")),
           "download from ModelScope"),
    EnvVar("VLLM_ALLOW_RUNTIME_LORA_UPDATING", ("allow_runtime_lora_updating",),
           _one("allow_runtime_lora_updating", _boolean("VLLM_ALLOW_RUNTIME_LORA_UPDATING")),
           "serve /v1/load_lora_adapter and /v1/unload_lora_adapter"),
    EnvVar("VLLM_LOG_STATS_INTERVAL", ("log_stats_interval",), _log_stats_interval,
           "seconds between throughput log lines"),
    EnvVar("HF_ENDPOINT", (), None, "the Hugging Face hub (or mirror) to download from"),
    EnvVar("HF_HUB_OFFLINE", (), None, "1: no network; models load from the hub cache only"),
    EnvVar("HF_TOKEN", (), None, "token for gated and private repos (also HUGGING_FACE_HUB_TOKEN)"),
    EnvVar("HF_HOME", (), None, "hub cache root (downloads go to $HF_HOME/hub unless --download-dir)"),
)

# The variables backing each option, in the order they are tried.
VARIABLES_BY_OPTION: dict[str, tuple[str, ...]] = {}
for _variable in ENVIRONMENT:
    for _option in _variable.options:
        VARIABLES_BY_OPTION[_option] = (*VARIABLES_BY_OPTION.get(_option, ()), _variable.name)


@dataclass(frozen=True)
class EnvironmentOptions:
    values: dict[str, Any]           # option name -> value
    sources: dict[str, str]          # option name -> the variable it came from


def environment_options(environ: Mapping[str, str]) -> EnvironmentOptions:
    """The options the set variables give; ValueError names a variable whose value is bad."""
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for variable in ENVIRONMENT:
        text = environ.get(variable.name)
        if variable.parse is None or text is None or text.strip() == "":
            continue
        for option, value in variable.parse(text).items():
            if option not in values:
                values[option], sources[option] = value, variable.name
    return EnvironmentOptions(values, sources)


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """'0-3,8' -> (0, 1, 2, 3, 8): a Linux CPU list, as VLLM_CPU_OMP_THREADS_BIND and cgroups write them."""
    cores: list[int] = []
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"{text!r} is not a CPU list like 0-3,8")
        low, high = int(first), int(last) if dash else int(first)
        if high < low:
            raise ValueError(f"{text!r} is not a CPU list like 0-3,8 ({part} runs backwards)")
        cores.extend(range(low, high + 1))
    if not cores:
        raise ValueError(f"{text!r} is not a CPU list like 0-3,8")
    return tuple(sorted(set(cores)))
