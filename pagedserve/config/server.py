"""What a user chooses about the HTTP server: `ServerConfig`, a frozen dataclass whose fields are the flags."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from pagedserve.config.duration import parse_duration

REASONING_PARSERS = ("deepseek_r1", "qwen3")
TOOL_CALL_PARSERS = ("hermes", "llama3_json", "mistral", "pythonic")
UVICORN_LOG_LEVELS = ("critical", "error", "warning", "info", "debug", "trace")
GENERATION_CONFIG_CHOICES = ("auto", "vllm")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")


@dataclass(frozen=True)
class ServerConfig:
    """Everything a user can set about the HTTP server. Each field is a `pagedserve serve` flag."""

    host: str = field(default="127.0.0.1", metadata={"help": "address to listen on"})
    port: int = field(default=8000, metadata={"help": "port to listen on"})
    served_model_name: tuple[str, ...] = field(
        default=(), metadata={"help": "model name(s) the API answers to (default: the --model value)"})
    api_key: tuple[str, ...] = field(
        default=(), repr=False, metadata={"help": "key(s) clients must send as 'Authorization: Bearer KEY' "
                                      "(default: none, the API is open)"})
    allowed_origins: tuple[str, ...] = field(
        default=(), metadata={"help": "CORS origins browsers may call from, beside localhost ones (always allowed, "
                                      "as Ollama does), e.g. https://ui.example or '[\"*\"]' for any; '*' may "
                                      "stand for part of one (https://*.example)"})
    allowed_methods: tuple[str, ...] = field(default=("*",), metadata={"help": "CORS methods"})
    allowed_headers: tuple[str, ...] = field(default=("*",), metadata={"help": "CORS headers"})
    allow_credentials: bool = field(
        default=False, metadata={"help": "CORS: allow credentials (cookies, auth headers) from the origins of an "
                                         "explicit --allowed-origins list, never from any origin ('*')"})
    ssl_keyfile: str | None = field(default=None, metadata={"help": "TLS private key file"})
    ssl_certfile: str | None = field(default=None, metadata={"help": "TLS certificate file"})
    uvicorn_log_level: str = field(default="info", metadata={"help": "uvicorn's log level",
                                                            "choices": UVICORN_LOG_LEVELS})
    disable_uvicorn_access_log: bool = field(default=False, metadata={"help": "no uvicorn access log lines"})
    disable_log_requests: bool = field(default=False, metadata={"help": "no log lines per request"})
    log_level: str = field(default="info", metadata={"help": "pagedserve's log level", "choices": LOG_LEVELS,
                                                      "case_insensitive": True})
    disable_log_stats: bool = field(default=False, metadata={"help": "no periodic throughput log line"})
    log_stats_interval: float = field(default=10.0, metadata={"help": "seconds between throughput log lines"})
    max_log_len: int | None = field(default=None, metadata={"help": "prompt characters shown in request logs"})
    reasoning_parser: str | None = field(
        default=None, metadata={"help": "split <think>...</think> into reasoning_content",
                                "choices": REASONING_PARSERS})
    enable_auto_tool_choice: bool = field(
        default=False, metadata={"help": "let the model decide to call tools (tool_choice auto); needs "
                                         "--tool-call-parser"})
    tool_call_parser: str | None = field(
        default=None, metadata={"help": "how tool calls are read out of the model's text (required/named "
                                        "tool_choice work without it)", "choices": TOOL_CALL_PARSERS})
    default_chat_template_kwargs: str | None = field(
        default=None, metadata={"help": "JSON object of chat template variables for every chat request (a "
                                        "request's chat_template_kwargs win), e.g. '{\"enable_thinking\": false}'"})
    response_role: str = field(default="assistant", metadata={"help": "role of generated chat messages"})
    trust_request_chat_template: bool = field(
        default=False, metadata={"help": "accept a chat template sent in a request (chat_template, Ollama's Jinja "
                                         "'template'); refused by default, as vLLM does: a template is code the "
                                         "server runs"})
    generation_config: str = field(
        default="auto", metadata={"help": "auto: the model's generation_config.json sets sampling defaults; "
                                          "vllm: OpenAI's defaults only", "choices": GENERATION_CONFIG_CHOICES})
    override_generation_config: str | None = field(
        default=None, metadata={"help": "JSON object of sampling defaults over the model's, e.g. "
                                        "'{\"temperature\": 0.6, \"max_new_tokens\": 1024}'"})
    max_request_body_bytes: int = field(default=32 * 2**20, metadata={"help": "largest request body (e.g. 32M)"})
    max_waiting_requests: int | None = field(
        default=512, metadata={"help": "requests per model that may wait for a place in the running batch; more get "
                                       "503 with Retry-After (Ollama's OLLAMA_MAX_QUEUE, same default)"})
    max_queue_time: float | None = field(
        default=None, metadata={"help": "seconds a request may wait for a place in the running batch before it "
                                        "fails with 503 and Retry-After (default: no limit)"})
    default_max_tokens: int = field(
        default=4096, metadata={"help": "output tokens for a request that sets no limit (no max_tokens or "
                                        "num_predict, no model default); a request may still ask for up to the "
                                        "context; 0: up to the context, as vLLM"})
    timeout_keep_alive: int = field(
        default=5, metadata={"help": "seconds an idle keep-alive connection stays open (uvicorn's, vLLM's default)"})
    timeout_request_header: float = field(
        default=30.0, metadata={"help": "seconds a client has to send a request's headers, from connecting or "
                                        "from its first byte; then the connection is closed (no slow senders)"})
    timeout_request_body: float = field(
        default=30.0, metadata={"help": "seconds a request body may go without a byte arriving; then 408"})
    shutdown_timeout: float = field(
        default=5.0, metadata={"help": "seconds in-flight requests get to finish after SIGTERM/SIGINT"})
    lazy_load: bool = field(default=False, metadata={"help": "load each model on its first request, not at start-up"})
    max_loaded_models: int | None = field(
        default=None, metadata={"help": "most models loaded at once; loading another unloads the one idle longest "
                                        "(default: no limit)"})
    keep_alive: str | None = field(
        default=None, metadata={"help": "unload a model idle this long, e.g. 5m, 1h, 0, -1 (never); default: never "
                                        "for models loaded at start-up, 5m for those loaded on first use"})
    enable_webui: bool = field(
        default=True, metadata={"help": "serve the web chat at / to browsers; with --no-webui, GET / only answers "
                                        "'Ollama is running', as it does for other clients", "aliases": ("--webui",)})

    allow_runtime_lora_updating: bool = field(default=False, metadata={
        "help": "serve /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING)"})

    @property
    def chat_template_kwargs(self) -> dict[str, Any]:
        """--default-chat-template-kwargs as a mapping ({} when not given)."""
        return json.loads(self.default_chat_template_kwargs) if self.default_chat_template_kwargs else {}

    def __post_init__(self) -> None:
        for name in ("served_model_name", "api_key", "allowed_origins", "allowed_methods", "allowed_headers"):
            object.__setattr__(self, name, _string_list(name, getattr(self, name)))
        object.__setattr__(self, "override_generation_config", _json_object_text(self.override_generation_config))
        object.__setattr__(self, "default_chat_template_kwargs", _template_kwargs_text(self.default_chat_template_kwargs))
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.uvicorn_log_level not in UVICORN_LOG_LEVELS:
            raise ValueError(f"uvicorn_log_level must be one of {', '.join(UVICORN_LOG_LEVELS)}, "
                             f"got {self.uvicorn_log_level!r}")
        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_PARSERS:
            raise ValueError(f"reasoning_parser must be one of {', '.join(REASONING_PARSERS)}, "
                             f"got {self.reasoning_parser!r}")
        if self.tool_call_parser is not None and self.tool_call_parser not in TOOL_CALL_PARSERS:
            raise ValueError(f"tool_call_parser must be one of {', '.join(TOOL_CALL_PARSERS)}, "
                             f"got {self.tool_call_parser!r}")
        if self.enable_auto_tool_choice and self.tool_call_parser is None:
            raise ValueError("--enable-auto-tool-choice needs --tool-call-parser (one of "
                             f"{', '.join(TOOL_CALL_PARSERS)})")
        if self.generation_config not in GENERATION_CONFIG_CHOICES:
            raise ValueError(f"generation_config must be one of {', '.join(GENERATION_CONFIG_CHOICES)}, "
                             f"got {self.generation_config!r}")
        if self.log_level not in LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}")
        if self.max_loaded_models is not None and self.max_loaded_models < 1:
            raise ValueError(f"max_loaded_models must be positive, got {self.max_loaded_models}")
        if self.log_stats_interval <= 0:
            raise ValueError(f"log_stats_interval must be positive, got {self.log_stats_interval}")
        if self.max_log_len is not None and self.max_log_len < 0:
            raise ValueError(f"max_log_len must be non-negative, got {self.max_log_len}")
        if self.max_request_body_bytes < 1:
            raise ValueError(f"max_request_body_bytes must be positive, got {self.max_request_body_bytes}")
        if self.max_waiting_requests is not None and self.max_waiting_requests < 1:
            raise ValueError(f"max_waiting_requests must be positive, got {self.max_waiting_requests}")
        if self.max_queue_time is not None and self.max_queue_time <= 0:
            raise ValueError(f"max_queue_time must be positive, got {self.max_queue_time}")
        if self.allow_credentials and (not self.allowed_origins or "*" in self.allowed_origins):
            raise ValueError("allow_credentials needs an explicit allowed_origins list (not '*'): a browser would "
                             "send any site's visitors' credentials otherwise")
        if self.default_max_tokens < 0:
            raise ValueError(f"default_max_tokens must be 0 (no cap) or positive, got {self.default_max_tokens}")
        for name in ("timeout_keep_alive", "timeout_request_header", "timeout_request_body"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.shutdown_timeout < 0:
            raise ValueError(f"shutdown_timeout must be non-negative, got {self.shutdown_timeout}")
        if self.keep_alive is not None:
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


def _json_object(name: str, value: Any) -> dict[str, Any] | None:
    """A flag's JSON object: given as JSON text (the command line) or as a mapping (a config file)."""
    if value is None or value == "":
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"{name} is not valid JSON: {error}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object, got {value!r}")
    return value


def _template_kwargs_text(value: Any) -> str | None:
    """`--default-chat-template-kwargs` as canonical JSON text (any JSON object)."""
    kwargs = _json_object("default_chat_template_kwargs", value)
    return None if kwargs is None else json.dumps(kwargs, sort_keys=True)


def _json_object_text(value: Any) -> str | None:
    """`--override-generation-config` as canonical JSON text, of the generation keys only."""
    overrides = _json_object("override_generation_config", value)
    if overrides is None:
        return None
    unknown = sorted(set(overrides) - set(_GENERATION_KEYS))
    if unknown:
        raise ValueError(f"override_generation_config: unknown keys {unknown}; known: {', '.join(_GENERATION_KEYS)}")
    return json.dumps(overrides, sort_keys=True)


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
