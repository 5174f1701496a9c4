"""The Ollama API's request bodies, its `options` mapped onto SamplingParams, and its response fields.

Field names, defaults and error messages follow Ollama's server (api/types.go, server/routes.go):
`stream` defaults to true; durations are nanoseconds; a sampling field the request leaves out takes
the model's default (a Modelfile PARAMETER, generation_config.json), else Ollama's own.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from pagedserve.config.duration import parse_duration
from pagedserve.outputs import RequestOutput
from pagedserve.sampling_params import OutputKind, SamplingParams, SamplingParamsError, StructuredOutputsParams
from pagedserve.store.defaults import SamplingDefaults

# Ollama's DefaultOptions() for what neither the request nor the model sets (SamplingParams fields).
OLLAMA_DEFAULTS = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "repetition_penalty": 1.0, "max_tokens": None}
# option -> (type Ollama checks, SamplingParams field it sets)
_OPTIONS: dict[str, tuple[type, str | None]] = {
    "num_predict": (int, "max_tokens"), "temperature": (float, "temperature"), "top_p": (float, "top_p"),
    "top_k": (int, "top_k"), "min_p": (float, "min_p"), "seed": (int, "seed"), "stop": (list, "stop"),
    "repeat_penalty": (float, "repetition_penalty"), "presence_penalty": (float, "presence_penalty"),
    "frequency_penalty": (float, "frequency_penalty"), "num_ctx": (int, None),
}
_TYPE_NAMES = {int: "integer", float: "float32", list: "array"}
_FOREVER = timedelta(days=365 * 290)   # what Ollama's `ps` shows as "Forever"


class OllamaBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str = ""
    name: str = ""                     # the older spelling of `model`


class InferenceBody(OllamaBody):
    stream: bool = True
    options: dict[str, Any] | None = None
    format: str | dict[str, Any] | None = None
    keep_alive: str | float | None = None
    think: bool | str | None = None    # see think_options

    def keep_alive_seconds(self) -> float | None:
        """The request's keep_alive in seconds (math.inf: forever), or None when it gives none."""
        return None if self.keep_alive is None else parse_duration(self.keep_alive)

    def structured_outputs(self) -> StructuredOutputsParams | None:
        """Ollama's `format`: "json" for any JSON object, or a JSON schema the answer must follow."""
        if self.format in (None, ""):
            return None
        if self.format == "json":
            return StructuredOutputsParams(json_object=True)
        if isinstance(self.format, dict):
            return StructuredOutputsParams(json=self.format)
        # Ollama's own wording for a format it cannot read
        raise SamplingParamsError("format", f"invalid format: {self.format!r}; expected \"json\" or a JSON schema")

    def check_supported(self) -> None:
        self.structured_outputs()


class ChatBody(InferenceBody):
    messages: list[dict[str, Any]] = []
    tools: list[dict[str, Any]] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if any(message.get("images") for message in self.messages if isinstance(message, dict)):
            raise ValueError("images are not supported: this server runs text-only models")


class GenerateBody(InferenceBody):
    prompt: str = ""
    suffix: str | None = None
    system: str | None = None
    template: str | None = None
    context: list[int] | None = None
    raw: bool = False
    images: list[str] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.images:
            raise ValueError("images are not supported: this server runs text-only models")
        if self.raw and (self.template or self.system or self.context):
            raise ValueError("raw mode does not support template, system, or context")


class ShowBody(OllamaBody):
    verbose: bool = False


class PullBody(OllamaBody):
    stream: bool = True
    insecure: bool = False


class CopyBody(BaseModel):
    model_config = ConfigDict(extra="ignore")

    source: str
    destination: str


class CreateBody(OllamaBody):
    """Ollama's /api/create: the structured fields (Ollama >= 0.5.5), or a whole `modelfile` (older)."""

    stream: bool = True
    from_: str | None = Field(default=None, alias="from")
    modelfile: str | None = None
    template: str | None = None
    system: str | None = None
    license: str | list[str] | None = None
    parameters: dict[str, Any] | None = None
    messages: list[dict[str, Any]] | None = None
    files: dict[str, str] | None = None
    adapters: dict[str, str] | None = None
    quantize: str | None = None


@dataclass(frozen=True)
class ThinkOptions:
    """What Ollama's `think` asks of the template and of the answer."""

    template_kwargs: dict[str, Any] | None
    reasoning_parser: str | None
    show: bool                         # send the thinking (false for think: false)


_THINK_LEVELS = ("low", "medium", "high")


def think_options(think: bool | str | None, reasoning_parser: str | None, chat_template: str | None,
                  model: str) -> ThinkOptions:
    """Ollama's `think`: true/false turn the template's thinking on or off (Qwen3's `enable_thinking`), a
    level is also passed as `reasoning_effort` (gpt-oss); the thinking comes back in `thinking`, split by
    --reasoning-parser, or by the qwen3 rules (only text inside <think>...</think>) for a model whose
    template knows thinking. Raises ValueError (400) when the model cannot think, as Ollama does."""
    if think is None:
        return ThinkOptions(None, reasoning_parser, True)
    if isinstance(think, str) and think not in _THINK_LEVELS:
        raise SamplingParamsError("think", f"invalid think value: {think!r} (must be true, false, \"low\", "
                                           f"\"medium\" or \"high\")")
    template = chat_template or ""
    can_think = reasoning_parser is not None or "<think>" in template or "enable_thinking" in template
    if think is False:
        return ThinkOptions({"enable_thinking": False}, reasoning_parser or ("qwen3" if can_think else None), False)
    if not can_think:
        raise SamplingParamsError("think", f'"{model}" does not support thinking')
    kwargs: dict[str, Any] = {"enable_thinking": True}
    if isinstance(think, str):
        kwargs["reasoning_effort"] = think
    return ThinkOptions(kwargs, reasoning_parser or "qwen3", True)


def ollama_tool_call(call: Any, index: int) -> dict[str, Any]:
    """A parsed call as Ollama's message.tool_calls item: the arguments as an object, not JSON text."""
    try:
        arguments = json.loads(call.arguments)
    except ValueError:
        arguments = {}
    return {"function": {"index": index, "name": call.name, "arguments": arguments}}


def sampling_params(options: dict[str, Any] | None, defaults: SamplingDefaults, stream: bool,
                    default_num_predict: int | None = None) -> tuple[SamplingParams, int | None]:
    """(SamplingParams, the request's num_ctx or None). Raises ValueError naming the bad option.

    `default_num_predict`: the output cap when neither the request nor the model sets num_predict
    (None: to the end of the context); num_predict -1 in either still means "to the end"."""
    given = _typed_options(options or {})
    request = {_OPTIONS[name][1]: value for name, value in given.items() if _OPTIONS[name][1] is not None}
    values = defaults.resolve(request, {**OLLAMA_DEFAULTS, "max_tokens": default_num_predict})
    # Ollama's sentinels, whoever set them: num_predict <= 0 has no limit, a negative seed is random.
    if values.get("max_tokens") is not None and values["max_tokens"] <= 0:
        values["max_tokens"] = None
    if values.get("seed") is not None and values["seed"] < 0:
        values["seed"] = None
    values["top_k"] = max(values["top_k"], 0)
    if isinstance(values.get("stop"), str):
        values["stop"] = [values["stop"]]
    params = SamplingParams(**values, output_kind=OutputKind.DELTA if stream else OutputKind.FINAL_ONLY)
    num_ctx = given.get("num_ctx")
    if num_ctx is not None and num_ctx < 1:
        raise SamplingParamsError("num_ctx", f"option \"num_ctx\" must be positive, got {num_ctx}")
    return params, num_ctx


def _typed_options(options: dict[str, Any]) -> dict[str, Any]:
    """The options this server uses, type-checked as Ollama checks them; the others are ignored."""
    typed = {}
    for name, value in options.items():
        if name not in _OPTIONS or value is None:
            continue
        kind = _OPTIONS[name][0]
        is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if kind is list and isinstance(value, str):
            value = [value]
        if kind is list and not (isinstance(value, list) and all(isinstance(item, str) for item in value)):
            raise SamplingParamsError(name, f"option \"{name}\" must be of an array of strings"
                                      if isinstance(value, list) else f"option \"{name}\" must be of type array")
        if kind is not list and not is_number:
            raise SamplingParamsError(name, f"option \"{name}\" must be of type {_TYPE_NAMES[kind]}")
        if kind is float and not math.isfinite(value):
            raise SamplingParamsError(name, f"option \"{name}\" must be a finite number")
        typed[name] = int(value) if kind is int else float(value) if kind is float else value
    return typed


# ---- responses ------------------------------------------------------------------------------------

def timestamp(unix_time: float | None = None) -> str:
    """RFC 3339 in UTC, as Ollama writes `created_at` and `modified_at`."""
    moment = datetime.now(timezone.utc) if unix_time is None else datetime.fromtimestamp(unix_time, timezone.utc)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def expires_at(unix_time: float | None) -> str:
    """When a loaded model unloads; None (never) as a date centuries away, as Ollama reports it."""
    if unix_time is None:
        return (datetime.now(timezone.utc) + _FOREVER).isoformat(timespec="seconds").replace("+00:00", "Z")
    return timestamp(unix_time)


def done_fields(output: RequestOutput, total_seconds: float, load_seconds: float) -> dict[str, Any]:
    """The last object's counts and durations (nanoseconds)."""
    completion = output.outputs[0]
    metrics = output.metrics
    prompt_seconds = eval_seconds = 0.0
    if metrics is not None and metrics.first_token_time is not None:
        started = metrics.first_scheduled_time or metrics.arrival_time
        prompt_seconds = metrics.first_token_time - started
        eval_seconds = (metrics.last_token_time or metrics.first_token_time) - metrics.first_token_time
    return {"done": True, "done_reason": completion.finish_reason or "stop",
            "total_duration": _nanoseconds(total_seconds), "load_duration": _nanoseconds(load_seconds),
            "prompt_eval_count": len(output.prompt_token_ids), "prompt_eval_duration": _nanoseconds(prompt_seconds),
            "eval_count": completion.num_output_tokens, "eval_duration": _nanoseconds(eval_seconds)}


def _nanoseconds(seconds: float) -> int:
    # NOTE: at least 1: clients divide counts by durations to print rates.
    return max(int(seconds * 1e9), 1)
