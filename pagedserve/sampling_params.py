"""How one request is sampled and when it stops."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

# Logit bias values outside this range are rejected, as OpenAI does.
_LOGIT_BIAS_LIMIT = 100.0
MAX_LOGPROBS = 20


class OutputKind(Enum):
    """What each output of a streaming request carries."""

    CUMULATIVE = "cumulative"   # the whole text so far
    DELTA = "delta"             # only what is new since the previous output
    FINAL_ONLY = "final_only"   # one output, when the request finishes


_GREEDY_TEMPERATURE = 1e-5

_STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object", "structural_tag")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """What the output must be, as vLLM's `StructuredOutputsParams`: exactly one of a JSON schema (a dict
    or its JSON text), a regex, a list of choices, an EBNF/GBNF (or Lark) grammar, any JSON object, or an
    xgrammar structural tag (a dict or its JSON text). Checked on construction; whether the schema,
    regex or grammar compiles is checked when the request is processed."""

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | dict[str, Any] | None = None
    # The grammar applies only after this text ends the output's reasoning (a reasoning model's
    # "</think>"): the thinking before it is free, as in vLLM.
    starts_after: str | None = None

    def __post_init__(self) -> None:
        given = [kind for kind in _STRUCTURED_KINDS if getattr(self, kind) not in (None, False)]
        _check(len(given) == 1, "structured_outputs",
               f"structured_outputs needs exactly one of {', '.join(_STRUCTURED_KINDS)}; got "
               f"{', '.join(given) or 'none'}")
        for kind in ("json", "structural_tag"):
            value = getattr(self, kind)
            if isinstance(value, str):
                try:
                    parsed = json.loads(value)
                except ValueError as error:
                    raise SamplingParamsError("structured_outputs", f"structured_outputs.{kind} is not valid JSON: "
                                                                    f"{error}") from None
                _check(isinstance(parsed, dict), "structured_outputs", f"structured_outputs.{kind} must be a "
                                                                       f"JSON object, got {value[:80]!r}")
            elif value is not None:
                _check(isinstance(value, dict), "structured_outputs",
                       f"structured_outputs.{kind} must be a JSON object, got {type(value).__name__}")
        if self.choice is not None:
            _check(bool(self.choice) and all(isinstance(c, str) for c in self.choice), "structured_outputs",
                   "structured_outputs.choice must be a non-empty list of strings")
        for kind in ("regex", "grammar"):
            value = getattr(self, kind)
            _check(value is None or (isinstance(value, str) and bool(value)), "structured_outputs",
                   f"structured_outputs.{kind} must be a non-empty string")

    @property
    def kind(self) -> str:
        return next(kind for kind in _STRUCTURED_KINDS if getattr(self, kind) not in (None, False))

    @property
    def value(self) -> Any:
        return getattr(self, self.kind)

    @property
    def key(self) -> tuple[str, str]:
        """Equal for requests that need the same grammar (the compile cache's key)."""
        value = self.value
        return self.kind, value if isinstance(value, str) else json.dumps(value, sort_keys=True)


@dataclass
class SamplingParams:
    """Sampling settings of one request. `validate()` runs on construction and raises ValueError."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0                     # 0 or -1: all tokens
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] | None = None
    seed: int | None = None
    max_tokens: int | None = 16        # None: up to the context limit
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None        # top logprobs to return with each sampled token
    prompt_logprobs: int | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    output_kind: OutputKind = OutputKind.CUMULATIVE
    structured_outputs: StructuredOutputsParams | None = None

    def __post_init__(self) -> None:
        if isinstance(self.structured_outputs, dict):
            unknown = set(self.structured_outputs) - set(_STRUCTURED_KINDS)
            _check(not unknown, "structured_outputs", f"structured_outputs has unknown fields {sorted(unknown)}")
            self.structured_outputs = StructuredOutputsParams(**self.structured_outputs)
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]
        if self.top_k == -1:
            self.top_k = 0
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        self.validate()

    def validate(self) -> None:
        _check(self.n >= 1, "n", f"n must be at least 1, got {self.n}")
        _check(self.temperature >= 0, "temperature", f"temperature must be non-negative, got {self.temperature}")
        _check(0 < self.top_p <= 1, "top_p", f"top_p must be in (0, 1], got {self.top_p}")
        _check(self.top_k >= 0, "top_k", f"top_k must be -1 (disable) or at least 1, got {self.top_k}")
        _check(0 <= self.min_p <= 1, "min_p", f"min_p must be in [0, 1], got {self.min_p}")
        _check(-2 <= self.presence_penalty <= 2, "presence_penalty",
               f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        _check(-2 <= self.frequency_penalty <= 2, "frequency_penalty",
               f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        _check(self.repetition_penalty > 0, "repetition_penalty",
               f"repetition_penalty must be positive, got {self.repetition_penalty}")
        _check(self.max_tokens is None or self.max_tokens >= 1, "max_tokens",
               f"max_tokens must be at least 1, got {self.max_tokens}")
        _check(self.min_tokens >= 0, "min_tokens", f"min_tokens must be non-negative, got {self.min_tokens}")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens, "min_tokens",
               f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            _check(value is None or 0 <= value <= MAX_LOGPROBS, name,
                   f"{name} must be in [0, {MAX_LOGPROBS}], got {value}")
        for token_id, bias in (self.logit_bias or {}).items():
            _check(-_LOGIT_BIAS_LIMIT <= bias <= _LOGIT_BIAS_LIMIT, "logit_bias",
                   f"logit_bias for token {token_id} must be in [-100, 100], got {bias}")
            _check(token_id >= 0, "logit_bias", f"logit_bias has a negative token id {token_id}")
        _check(all(t >= 0 for t in self.stop_token_ids), "stop_token_ids", "stop_token_ids must be non-negative")

    @property
    def is_greedy(self) -> bool:
        # As in vLLM, a temperature this small is greedy: dividing logits by it would overflow.
        return self.temperature < _GREEDY_TEMPERATURE

    def replace(self, **changes) -> SamplingParams:
        return dataclasses.replace(self, **changes)


class SamplingParamsError(ValueError):
    """A sampling parameter is out of range; `param` names it (the server reports it)."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def _check(condition: bool, param: str, message: str) -> None:
    if not condition:
        raise SamplingParamsError(param, message)
