"""From what a client sends to what the engine runs: chat prompts rendered, prompts tokenized, requests
checked against the model once, sampling defaults applied.

The processor holds the tokenizer and the model's limits but no engine state, so it runs wherever the
request arrives (the server's worker threads, the offline `LLM`'s caller), never on the step loop. What it
hands on, an `EngineRequest`, is plain data the engine queues without looking again.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

from pagedserve.loader.chat_template import render_chat_prompt
from pagedserve.sampling_params import SamplingParams, SamplingParamsError
from pagedserve.store.defaults import ModelDefaults, SamplingDefaults, sampling_defaults

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineRequest:
    """A checked request: its prompt tokenized, its max_tokens resolved within the context."""

    request_id: str
    prompt: str | None               # the text, when the prompt came as text
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int
    arrival_time: float = field(default_factory=time.time)
    lora_name: str | None = None     # the LoRA adapter serving it (loaded in the engine), None = base model


@dataclass(frozen=True)
class ChatOptions:
    """How a conversation becomes a prompt (the chat API's and the tokenize API's options)."""

    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None             # the request's own, instead of the model's
    tools: list[dict[str, Any]] | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool = False             # the template writes BOS itself
    with_model_defaults: bool = True             # start with the created model's SYSTEM and MESSAGEs


@dataclass(frozen=True)
class ChatPrompt:
    text: str
    token_ids: list[int]


@dataclass(frozen=True)
class ModelLimits:
    """What a request is checked against."""

    vocab_size: int
    max_model_len: int
    max_num_seqs: int


class InputProcessor:
    def __init__(self, tokenizer: Any, limits: ModelLimits, model_defaults: ModelDefaults,
                 defaults: SamplingDefaults) -> None:
        self.tokenizer = tokenizer
        self.limits = limits
        self.model_defaults = model_defaults
        self.sampling_defaults = defaults

    @classmethod
    def for_engine(cls, engine: Any, model_defaults: ModelDefaults = ModelDefaults(), *,
                   sampling_overrides: Mapping[str, Any] | None = None,
                   use_generation_config: bool = True) -> InputProcessor:
        """The processor for a loaded LLMEngine, with the created model's defaults (if any) over the
        checkpoint's generation_config.json, and `sampling_overrides` over both."""
        defaults = sampling_defaults(engine.generation_config, model_defaults, sampling_overrides,
                                     use_generation_config)
        if defaults:
            logger.info("%s: sampling defaults for fields a request leaves out: %s", engine.config.model,
                        dict(defaults.values))
        limits = ModelLimits(engine.model_config.vocab_size, engine.max_model_len, engine.config.max_num_seqs)
        return cls(engine.tokenizer, limits, model_defaults, defaults)

    # ---- text <-> tokens ------------------------------------------------------------------------

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, token_ids: list[int]) -> str:
        self.check_token_ids(token_ids, "tokens")
        return self.tokenizer.decode(token_ids)

    def token_strings(self, token_ids: list[int]) -> list[str]:
        return self.tokenizer.convert_ids_to_tokens(token_ids)

    @property
    def chat_template(self) -> str | None:
        return self.tokenizer.chat_template

    def render_chat(self, messages: list[dict[str, Any]], options: ChatOptions = ChatOptions()) -> ChatPrompt:
        """The conversation through the chat template (after the created model's opening messages, unless
        `options.with_model_defaults` is off), and its tokens. Raises ValueError (NoChatTemplateError
        for a model without a template)."""
        if options.with_model_defaults:
            messages = self.model_defaults.chat_messages(messages)
        text = render_chat_prompt(self.tokenizer, messages, add_generation_prompt=options.add_generation_prompt,
                                  continue_final_message=options.continue_final_message,
                                  chat_template=options.chat_template, tools=options.tools,
                                  chat_template_kwargs=options.chat_template_kwargs)
        return ChatPrompt(text, self.tokenize(text, add_special_tokens=options.add_special_tokens))

    # ---- checks ---------------------------------------------------------------------------------

    def check_token_ids(self, token_ids: list[int], param: str) -> None:
        vocab_size = self.limits.vocab_size
        bad = [token_id for token_id in token_ids if not 0 <= token_id < vocab_size]
        if bad:
            raise SamplingParamsError(param, f"token ids must be in [0, {vocab_size}); got {bad[0]}")

    def process(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                add_special_tokens: bool = True, arrival_time: float | None = None,
                lora_name: str | None = None) -> EngineRequest:
        """Tokenize and check one request; raises ValueError (naming the field as `param` where there is
        one) for anything the engine could not serve."""
        prompt_token_ids = self.tokenize(prompt, add_special_tokens) if isinstance(prompt, str) else list(prompt)
        max_tokens = self.check(prompt_token_ids, params)
        return EngineRequest(request_id, prompt if isinstance(prompt, str) else None, prompt_token_ids, params,
                             max_tokens, time.time() if arrival_time is None else arrival_time, lora_name)

    def check(self, prompt_token_ids: list[int], params: SamplingParams) -> int:
        """Check a request against the model; returns its resolved max_tokens."""
        limits = self.limits
        if params.n > limits.max_num_seqs:
            raise SamplingParamsError("n", f"n must be at most {limits.max_num_seqs} (--max-num-seqs), "
                                           f"got {params.n}")
        for token_id in params.logit_bias or {}:
            if token_id >= limits.vocab_size:
                raise SamplingParamsError("logit_bias", f"logit_bias token id {token_id} is out of vocabulary "
                                                        f"(size {limits.vocab_size})")
        num_prompt = len(prompt_token_ids)
        if num_prompt == 0:
            raise SamplingParamsError("prompt", "the prompt is empty")
        self.check_token_ids(prompt_token_ids, "prompt")
        max_model_len = limits.max_model_len
        if num_prompt >= max_model_len:
            raise ValueError(f"This model's maximum context length is {max_model_len} tokens. However, your "
                             f"prompt has {num_prompt} tokens, which leaves no room for output. Please reduce the "
                             f"length of the prompt.")
        if params.max_tokens is None:
            return max_model_len - num_prompt
        if num_prompt + params.max_tokens > max_model_len:
            raise ValueError(f"This model's maximum context length is {max_model_len} tokens. However, you "
                             f"requested {num_prompt + params.max_tokens} tokens ({num_prompt} in the prompt, "
                             f"{params.max_tokens} in the completion). Please reduce the length of the prompt "
                             f"or completion.")
        return params.max_tokens
