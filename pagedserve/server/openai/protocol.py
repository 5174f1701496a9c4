"""The OpenAI API's request and response bodies (pydantic), with vLLM's extra request fields.

Unknown request fields are ignored, as OpenAI's and vLLM's servers do. Fields a request leaves out
take the model's default when it has one (store/defaults.py: generation_config.json, a Modelfile
PARAMETER, or --override-generation-config), else OpenAI's.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from pagedserve.sampling_params import OutputKind, SamplingParams, SamplingParamsError, StructuredOutputsParams
from pagedserve.store.defaults import SamplingDefaults

_INT64 = 2**63


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(OpenAIModel):
    include_usage: bool | None = True
    continuous_usage_stats: bool | None = False


class JsonSchemaFormat(OpenAIModel):
    name: str | None = None
    description: str | None = None
    # OpenAI's name is `schema`; pydantic models may not own that attribute name, hence the alias.
    json_schema: dict[str, Any] | None = Field(default=None, alias="schema")
    strict: bool | None = None        # the grammar is always enforced, strict or not (as vLLM does)


class ResponseFormat(OpenAIModel):
    type: str = "text"
    json_schema: JsonSchemaFormat | None = None
    # vLLM's structural_tag response format (xgrammar's form, or {structures, triggers})
    structures: list[dict[str, Any]] | None = None
    triggers: list[str] | None = None
    format: dict[str, Any] | None = None

    def structured_outputs(self) -> StructuredOutputsParams | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredOutputsParams(json_object=True)
        if self.type == "json_schema":
            if self.json_schema is None or self.json_schema.json_schema is None:
                raise _invalid("response_format", "response_format json_schema needs json_schema.schema")
            return StructuredOutputsParams(json=self.json_schema.json_schema)
        if self.type == "structural_tag":
            tag = self.model_dump(exclude_none=True, exclude={"json_schema"})
            return StructuredOutputsParams(structural_tag=tag)
        raise _invalid("response_format", f"unknown response_format type {self.type!r}; use text, json_object, "
                                          "json_schema or structural_tag")


class SamplingRequest(OpenAIModel):
    """Fields chat and completions requests share."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = Field(default=None, ge=-_INT64, lt=_INT64)
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    prompt_logprobs: int | None = None
    echo: bool = False
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: ResponseFormat | None = None
    # vLLM's structured output: {json, regex, choice, grammar, json_object, structural_tag}, and its
    # older guided_* fields
    structured_outputs: dict[str, Any] | None = None
    guided_json: str | dict[str, Any] | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    user: str | None = None

    def structured_outputs_params(self) -> StructuredOutputsParams | None:
        """The one structured-output constraint of the request (response_format, structured_outputs or
        guided_*); raises SamplingParamsError when it gives none valid or more than one."""
        given: list[tuple[str, StructuredOutputsParams]] = []
        if self.response_format is not None:
            spec = self.response_format.structured_outputs()
            if spec is not None:
                given.append(("response_format", spec))
        if self.structured_outputs:
            fields = {k: v for k, v in self.structured_outputs.items() if v is not None and
                      k not in ("disable_any_whitespace", "disable_additional_properties", "whitespace_pattern")}
            given.append(("structured_outputs", SamplingParams(structured_outputs=fields).structured_outputs))
        legacy = {"json": self.guided_json, "regex": self.guided_regex, "choice": self.guided_choice,
                  "grammar": self.guided_grammar}
        for kind, value in legacy.items():
            if value is not None:
                given.append((f"guided_{kind}", StructuredOutputsParams(**{kind: value})))
        if len(given) > 1:
            raise _invalid(given[1][0], f"give one structured output constraint, not "
                                        f"{' and '.join(name for name, _ in given)}")
        return given[0][1] if given else None

    def _sampling_params(self, defaults: SamplingDefaults, output_kind: OutputKind, max_tokens: int | None,
                         logprobs: int | None) -> SamplingParams:
        """Raises SamplingParamsError (a ValueError naming the field) for values out of range."""
        stop = [self.stop] if isinstance(self.stop, str) else self.stop
        request = {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
                   "repetition_penalty": self.repetition_penalty, "presence_penalty": self.presence_penalty,
                   "frequency_penalty": self.frequency_penalty, "seed": self.seed, "stop": stop,
                   "max_tokens": max_tokens}
        # NOTE: a request without max_tokens may run to the end of the context, as OpenAI's API does.
        values = defaults.resolve(request, fallbacks={"max_tokens": None})
        return SamplingParams(
            **values, n=self.n, logit_bias=_token_bias(self.logit_bias), min_tokens=self.min_tokens,
            stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos, logprobs=logprobs,
            prompt_logprobs=self.prompt_logprobs, include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens, output_kind=output_kind,
            structured_outputs=self.structured_outputs_params())

    def check_supported(self) -> None:
        """Raises ValueError for what this server accepts in the API but cannot do."""
        if self.stream_options is not None and not self.stream:
            raise _invalid("stream_options", "stream_options can only be given when stream is true")

    @property
    def include_usage(self) -> bool:
        """A last chunk with the usage (and `choices: []`)."""
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """Usage on every chunk; as in vLLM, only together with include_usage (which defaults to true)."""
        return self.include_usage and bool(self.stream_options.continuous_usage_stats)


class ChatCompletionRequest(SamplingRequest):
    messages: list[dict[str, Any]] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    include_reasoning: bool = True       # vLLM's: false leaves the reasoning out of the answer
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False

    def to_sampling_params(self, defaults: SamplingDefaults, output_kind: OutputKind) -> SamplingParams:
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        try:
            return self._sampling_params(defaults, output_kind, max_tokens, logprobs)
        except SamplingParamsError as error:
            if error.param != "logprobs":
                raise
            raise _invalid("top_logprobs", str(error).replace("logprobs", "top_logprobs", 1)) from None

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs is not None and not self.logprobs and self.top_logprobs > 0:
            raise _invalid("top_logprobs", "top_logprobs needs logprobs to be true")
        # NOTE: add_generation_prompt defaults to true, so only an explicit true conflicts.
        if self.continue_final_message and self.add_generation_prompt and "add_generation_prompt" in self.model_fields_set:
            raise _invalid("continue_final_message",
                           "continue_final_message and add_generation_prompt cannot both be true")
        check_roles(self.messages)


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    suffix: str | None = None
    best_of: int | None = None
    add_special_tokens: bool = True

    def to_sampling_params(self, defaults: SamplingDefaults, output_kind: OutputKind) -> SamplingParams:
        params = self._sampling_params(defaults, output_kind, self.max_tokens, self.logprobs)
        if self.echo and self.logprobs is not None and params.prompt_logprobs is None:
            params = params.replace(prompt_logprobs=self.logprobs)   # echoed tokens carry logprobs too
        return params

    def check_supported(self) -> None:
        super().check_supported()
        if self.suffix:
            raise _invalid("suffix", "suffix is not supported")
        if self.best_of is not None and self.best_of != self.n:
            raise _invalid("best_of", "best_of is not supported (it may only equal n)")

    def prompts(self) -> list[str | list[int]]:
        """The prompt as a list of prompts (strings or token id lists)."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise _invalid("prompt", "prompt must not be empty")
        if all(isinstance(item, int) for item in prompt):
            return [list(prompt)]
        if any(isinstance(item, list) and not item for item in prompt):
            raise _invalid("prompt", "prompt token id lists must not be empty")
        return list(prompt)


class LoadLoRAAdapterRequest(OpenAIModel):
    """vLLM's /v1/load_lora_adapter."""

    lora_name: str = ""
    lora_path: str = ""


class UnloadLoRAAdapterRequest(OpenAIModel):
    """vLLM's /v1/unload_lora_adapter."""

    lora_name: str
    lora_int_id: int | None = None


class TokenizeRequest(OpenAIModel):
    """vLLM's /tokenize: a completion `prompt` or chat `messages`."""

    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(OpenAIModel):
    model: str | None = None
    tokens: list[int]


# ---- responses ------------------------------------------------------------------------------------

class PromptTokensDetails(OpenAIModel):
    cached_tokens: int = 0


class Usage(OpenAIModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    prompt_tokens_details: PromptTokensDetails | None = None

    @classmethod
    def of(cls, num_prompt_tokens: int, num_completion_tokens: int, num_cached_tokens: int = 0) -> Usage:
        details = PromptTokensDetails(cached_tokens=num_cached_tokens) if num_cached_tokens else None
        return cls(prompt_tokens=num_prompt_tokens, completion_tokens=num_completion_tokens,
                   total_tokens=num_prompt_tokens + num_completion_tokens, prompt_tokens_details=details)


class ChatMessage(OpenAIModel):
    role: str
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[dict[str, Any]] = Field(default_factory=list)


class ChatChoice(OpenAIModel):
    index: int
    message: ChatMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionResponse(OpenAIModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    prompt_logprobs: list[dict[str, Any] | None] | None = None


class CompletionChoice(OpenAIModel):
    index: int
    text: str
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: list[dict[str, Any] | None] | None = None


class CompletionResponse(OpenAIModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


def _token_bias(logit_bias: dict[str, float] | None) -> dict[int, float] | None:
    if not logit_bias:
        return None
    biases = {}
    for key, value in logit_bias.items():
        try:
            biases[int(key)] = value
        except ValueError:
            raise _invalid("logit_bias", f"logit_bias keys must be token ids, got {key!r}") from None
    return biases


# The roles OpenAI's chat API takes ("function" is its deprecated spelling of "tool").
CHAT_ROLES = ("system", "assistant", "user", "function", "tool", "developer")


def check_roles(messages: list[dict[str, Any]]) -> None:
    """400 for a message whose role OpenAI would refuse, in its words and with its param."""
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role is None or role in CHAT_ROLES:
            continue   # a message without a role gets its own error when rendered
        quoted = ", ".join(f"'{name}'" for name in CHAT_ROLES[:-1]) + f", and '{CHAT_ROLES[-1]}'"
        shown = f"'{role}'" if isinstance(role, str) else json.dumps(role)[:100]
        raise _invalid(f"messages.[{index}].role", f"Invalid value: {shown}. Supported values are: {quoted}.")


def _invalid(param: str, message: str) -> ValueError:
    return SamplingParamsError(param, message)


# ---- streamed chunks (sent without the fields never set) ------------------------------------------

class DeltaMessage(OpenAIModel):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChunkChoice(OpenAIModel):
    index: int
    delta: DeltaMessage
    logprobs: dict[str, Any] | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(OpenAIModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChunk(OpenAIModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
