"""Engine, server and model configuration: frozen dataclasses validated at construction.

`EngineConfig` and `ServerConfig` hold what a user chooses (their fields become the CLI flags);
`ModelConfig` holds what the checkpoint dictates and is built from a transformers config, whatever
format the weights came in.
"""
from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"

OMP_WAIT_POLICIES = ("auto", "active", "passive")
DTYPE_CHOICES = ("auto", "half", "float16", "bfloat16", "float", "float32")
REASONING_PARSERS = ("deepseek_r1", "qwen3")
UVICORN_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
GENERATION_CONFIG_CHOICES = ("auto", "vllm")


@dataclass(frozen=True)
class EngineConfig:
    """Everything a user can set about the engine. Each field is a `pagedserve serve` flag."""

    model: str = field(default=DEFAULT_MODEL, metadata={"help": "alias, Hugging Face folder or repo id, or .gguf file"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer folder or repo id (default: the model's)"})
    revision: str | None = field(default=None, metadata={"help": "hub revision to download"})
    download_dir: str | None = field(default=None, metadata={"help": "where hub downloads are cached"})
    models_dir: str | None = field(
        default=None, metadata={"help": "models made with `pagedserve create` (default: $PAGEDSERVE_MODELS or "
                                        "~/.local/share/pagedserve/models); given to `serve`, serves them all"})
    dtype: str = field(default="auto", metadata={"help": "compute dtype", "choices": DTYPE_CHOICES})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N or auto"})
    max_model_len: int | None = field(default=None, metadata={"help": "context length (default: the model's)"})
    block_size: int = field(default=16, metadata={"help": "tokens per KV cache block"})
    kv_cache_space: float | None = field(
        default=None, metadata={"help": "KV cache size in GiB on CPU (default: 30%% of free memory, at most 0.75)"})
    gpu_memory_utilization: float = field(default=0.9, metadata={"help": "share of GPU memory to use (CUDA only)"})
    num_kv_blocks: int | None = field(default=None, metadata={"help": "exact number of KV blocks (overrides sizing)"})
    enable_prefix_caching: bool = field(default=True, metadata={"help": "reuse KV blocks of shared prefixes"})
    max_num_seqs: int = field(default=256, metadata={"help": "most sequences in one batch"})
    max_num_batched_tokens: int | None = field(
        default=None, metadata={"help": "token budget of one engine step (default 512 on CPU, 2048 on CUDA)"})
    seed: int = field(default=0, metadata={"help": "seed for requests that give none"})
    enforce_eager: bool = field(default=False, metadata={
        "help": "plain PyTorch ops only: no fused C++ decode kernels or packed quantized weights (slower; for debugging)"})
    num_threads: int | None = field(default=None, metadata={"help": "CPU threads (default: physical cores)"})
    omp_wait_policy: str = field(default="auto", metadata={
        "choices": OMP_WAIT_POLICIES,
        "help": "how idle OpenMP threads wait between ops: active spins (fastest on an otherwise idle machine), "
                "passive sleeps (several times faster when other processes compete for the cores), auto leaves "
                "the runtime's spin-then-sleep (about as fast as active when idle); applies at start-up only"})
    chat_template: str | None = field(default=None, metadata={"help": "Jinja chat template, as a file or a string"})
    quantization: str | None = field(default=None, metadata={"help": "weight quantization method",
                                                              "aliases": ("-q",)})
    tensor_parallel_size: int = field(default=1, metadata={"help": "tensor parallel ranks", "aliases": ("-tp",)})
    pipeline_parallel_size: int = field(default=1, metadata={"help": "pipeline parallel stages",
                                                             "aliases": ("-pp",)})

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        if self.block_size < 1 or self.block_size > 1024:
            raise ValueError(f"block_size must be in [1, 1024], got {self.block_size}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")
        if self.kv_cache_space is not None and self.kv_cache_space <= 0:
            raise ValueError(f"kv_cache_space must be positive GiB, got {self.kv_cache_space}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be positive, got {self.num_kv_blocks}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}")
        if self.omp_wait_policy not in OMP_WAIT_POLICIES:
            raise ValueError(f"omp_wait_policy must be one of {', '.join(OMP_WAIT_POLICIES)}, "
                             f"got {self.omp_wait_policy!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be positive, got {self.num_threads}")
        if self.tensor_parallel_size < 1 or self.pipeline_parallel_size < 1:
            raise ValueError("tensor_parallel_size and pipeline_parallel_size must be positive")

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True)
class ServerConfig:
    """Everything a user can set about the HTTP server. Each field is a `pagedserve serve` flag."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=8000, metadata={"help": "port to listen on"})
    served_model_name: tuple[str, ...] = field(
        default=(), metadata={"help": "model name(s) the API answers to (default: the --model value)"})
    api_key: tuple[str, ...] = field(
        default=(), repr=False, metadata={"help": "key(s) clients must send as 'Authorization: Bearer KEY' "
                                      "(default: $PAGEDSERVE_API_KEY or $VLLM_API_KEY; none: open)"})
    allowed_origins: tuple[str, ...] = field(default=("*",), metadata={"help": "CORS origins, e.g. '[\"*\"]'"})
    allowed_methods: tuple[str, ...] = field(default=("*",), metadata={"help": "CORS methods"})
    allowed_headers: tuple[str, ...] = field(default=("*",), metadata={"help": "CORS headers"})
    allow_credentials: bool = field(default=False, metadata={"help": "CORS: allow credentials"})
    ssl_keyfile: str | None = field(default=None, metadata={"help": "TLS private key file"})
    ssl_certfile: str | None = field(default=None, metadata={"help": "TLS certificate file"})
    uvicorn_log_level: str = field(default="info", metadata={"help": "uvicorn's log level",
                                                            "choices": UVICORN_LOG_LEVELS})
    disable_uvicorn_access_log: bool = field(default=False, metadata={"help": "no uvicorn access log lines"})
    disable_log_requests: bool = field(default=False, metadata={"help": "no log lines per request"})
    disable_log_stats: bool = field(default=False, metadata={"help": "no periodic throughput log line"})
    log_stats_interval: float = field(default=10.0, metadata={"help": "seconds between throughput log lines"})
    max_log_len: int | None = field(default=None, metadata={"help": "prompt characters shown in request logs"})
    reasoning_parser: str | None = field(
        default=None, metadata={"help": "split <think>...</think> into reasoning_content",
                                "choices": REASONING_PARSERS})
    response_role: str = field(default="assistant", metadata={"help": "role of generated chat messages"})
    generation_config: str = field(
        default="auto", metadata={"help": "auto: the model's generation_config.json sets sampling defaults; "
                                          "vllm: OpenAI's defaults only", "choices": GENERATION_CONFIG_CHOICES})
    override_generation_config: str | None = field(
        default=None, metadata={"help": "JSON object of sampling defaults over the model's, e.g. "
                                        "'{\"temperature\": 0.6, \"max_new_tokens\": 1024}'"})
    max_request_body_bytes: int = field(default=32 * 2**20, metadata={"help": "largest request body (e.g. 32M)"})
    shutdown_timeout: float = field(
        default=5.0, metadata={"help": "seconds in-flight requests get to finish after SIGTERM/SIGINT"})
    lazy_load: bool = field(default=False, metadata={"help": "load each model on its first request, not at start-up"})
    keep_alive: str | None = field(
        default=None, metadata={"help": "unload a model idle this long, e.g. 5m, 1h, 0, -1 (never); default: never "
                                        "for models loaded at start-up, 5m for those loaded on first use"})
    enable_webui: bool = field(
        default=True, metadata={"help": "serve the web chat at / to browsers; with --no-webui, GET / only answers "
                                        "'Ollama is running', as it does for other clients", "aliases": ("--webui",)})

    def __post_init__(self) -> None:
        for name in ("served_model_name", "api_key", "allowed_origins", "allowed_methods", "allowed_headers"):
            object.__setattr__(self, name, _string_list(name, getattr(self, name)))
        object.__setattr__(self, "override_generation_config", _json_object_text(self.override_generation_config))
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.uvicorn_log_level not in UVICORN_LOG_LEVELS:
            raise ValueError(f"uvicorn_log_level must be one of {', '.join(UVICORN_LOG_LEVELS)}, "
                             f"got {self.uvicorn_log_level!r}")
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"reasoning_parser must be one of {', '.join(REASONING_PARSERS)}, "
                             f"got {self.reasoning_parser!r}")
        if self.generation_config not in GENERATION_CONFIG_CHOICES:
            raise ValueError(f"generation_config must be one of {', '.join(GENERATION_CONFIG_CHOICES)}, "
                             f"got {self.generation_config!r}")
        if self.log_stats_interval <= 0:
            raise ValueError(f"log_stats_interval must be positive, got {self.log_stats_interval}")
        if self.max_log_len is not None and self.max_log_len < 0:
            raise ValueError(f"max_log_len must be non-negative, got {self.max_log_len}")
        if self.max_request_body_bytes < 1:
            raise ValueError(f"max_request_body_bytes must be positive, got {self.max_request_body_bytes}")
        if self.shutdown_timeout < 0:
            raise ValueError(f"shutdown_timeout must be non-negative, got {self.shutdown_timeout}")
        if self.keep_alive is not None:
            from pagedserve.duration import parse_duration

            parse_duration(self.keep_alive)
        if self.ssl_keyfile and not self.ssl_certfile:
            raise ValueError("ssl_keyfile needs ssl_certfile too")
        if not self.response_role:
            raise ValueError("response_role must not be empty")

    @property
    def generation_overrides(self) -> dict[str, Any]:
        return json.loads(self.override_generation_config) if self.override_generation_config else {}

    def replace(self, **changes: Any) -> ServerConfig:
        return dataclasses.replace(self, **changes)


_GENERATION_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens")


def _json_object_text(value: Any) -> str | None:
    """`--override-generation-config` as canonical JSON text; a config file may give a mapping."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"override_generation_config is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise ValueError(f"override_generation_config must be a JSON object, got {value!r}")
    unknown = sorted(set(value) - set(_GENERATION_KEYS))
    if unknown:
        raise ValueError(f"override_generation_config: unknown keys {unknown}; known: {', '.join(_GENERATION_KEYS)}")
    return json.dumps(value, sort_keys=True)


def _string_list(name: str, value: Any) -> tuple[str, ...]:
    """A tuple of strings from a string, a list, or list items that are JSON lists (vLLM's
    `--allowed-origins '["*"]'` form)."""
    items = [value] if isinstance(value, str) else list(value or ())
    strings: list[str] = []
    for item in items:
        text = str(item).strip()
        if text.startswith("["):
            try:
                decoded = json.loads(text)
            except json.JSONDecodeError as error:
                raise ValueError(f"{name}: {text!r} is not a JSON list ({error})") from None
            if not isinstance(decoded, list):
                raise ValueError(f"{name}: {text!r} is not a JSON list")
            strings.extend(str(entry) for entry in decoded)
        elif text:
            strings.append(text)
    return tuple(strings)


def token_ids(value: int | list[int] | tuple[int, ...] | None) -> tuple[int, ...]:
    """An id-or-ids setting (eos_token_id in config.json, generation_config.json, a tokenizer) as a tuple."""
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of a checkpoint, normalised from its transformers config."""

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    hidden_act: str = "silu"
    # NOTE: one entry per layer; None means full attention, an int is that layer's window in tokens.
    sliding_windows: tuple[int | None, ...] = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    checkpoint_dtype: str | None = None
    # Gemma-style knobs; the Llama family leaves them at their defaults.
    qk_norm: bool = False
    query_pre_attn_scalar: float | None = None
    local_rope_theta: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if len(self.sliding_windows) != self.num_hidden_layers:
            raise ValueError("sliding_windows needs one entry per layer")

    @classmethod
    def from_hf(cls, hf_config: Any) -> ModelConfig:
        """Build from a transformers `PretrainedConfig` (any supported family)."""
        # A multimodal checkpoint names its class on the outer config and its text model in text_config.
        architectures = getattr(hf_config, "architectures", None) or []
        hf_config = getattr(hf_config, "text_config", None) or hf_config
        model_type = hf_config.model_type
        architecture = architectures[0] if architectures else _default_architecture(model_type)
        num_heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
        num_layers = hf_config.num_hidden_layers
        rope_theta, rope_scaling, local_rope_theta = _rope_settings(hf_config)
        eos_ids = token_ids(hf_config.eos_token_id)
        dtype = getattr(hf_config, "dtype", None)
        return cls(
            architecture=architecture,
            model_type=model_type,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=hf_config.intermediate_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=hf_config.rms_norm_eps,
            max_position_embeddings=hf_config.max_position_embeddings,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(hf_config, "attention_bias", model_type == "qwen2")),
            hidden_act=getattr(hf_config, "hidden_act", None) or getattr(hf_config, "hidden_activation", "silu"),
            sliding_windows=_sliding_windows(hf_config, num_layers),
            bos_token_id=hf_config.bos_token_id,
            eos_token_ids=eos_ids,
            checkpoint_dtype=str(dtype).removeprefix("torch.") if dtype is not None else None,
            qk_norm=model_type in ("qwen3", "gemma3_text", "gemma3"),
            query_pre_attn_scalar=getattr(hf_config, "query_pre_attn_scalar", None),
            local_rope_theta=local_rope_theta,
            attn_logit_softcapping=getattr(hf_config, "attn_logit_softcapping", None),
            final_logit_softcapping=getattr(hf_config, "final_logit_softcapping", None),
        )

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V one token occupies across all layers, per byte of element size."""
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim


_DEFAULT_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}


def _default_architecture(model_type: str) -> str:
    return _DEFAULT_ARCHITECTURES.get(model_type, model_type)


def _rope_settings(hf_config: Any) -> tuple[float, dict[str, Any] | None, float | None]:
    """(global rope theta, scaling dict or None, local-layer rope theta or None).

    transformers 5 keeps these in `rope_parameters` (per layer type for Gemma 3); older configs in
    `rope_theta` and `rope_scaling`. Both are read so either kind of config.json works.
    """
    params = getattr(hf_config, "rope_parameters", None) or {}
    local_theta = None
    if "full_attention" in params:
        local = params.get("sliding_attention") or {}
        local_theta = local.get("rope_theta")
        local_type = local.get("rope_type") or local.get("type") or "default"
        if local_type != "default":
            raise ValueError(f"rope scaling {local_type!r} on the sliding-window layers is not supported "
                             "(only their rope_theta is)")
        params = params["full_attention"]
    theta = params.get("rope_theta") or getattr(hf_config, "rope_theta", None) or 10000.0
    local_theta = local_theta or getattr(hf_config, "rope_local_base_freq", None)
    scaling = dict(params) if params else dict(getattr(hf_config, "rope_scaling", None) or {})
    scaling.pop("rope_theta", None)
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    return float(theta), (scaling if rope_type != "default" else None), local_theta


def _sliding_windows(hf_config: Any, num_layers: int) -> tuple[int | None, ...]:
    window = getattr(hf_config, "sliding_window", None)
    if not window or getattr(hf_config, "use_sliding_window", True) is False:
        return (None,) * num_layers
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types:
        return tuple(window if kind == "sliding_attention" else None for kind in layer_types)
    return (int(window),) * num_layers
