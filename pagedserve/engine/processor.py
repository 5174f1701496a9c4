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

from pagedserve.engine.structured_output import GrammarCompiler
from pagedserve.config.pooler import PoolerConfig
from pagedserve.loader.chat_template import render_chat_prompt
from pagedserve.pooling_params import PoolingParams
from pagedserve.sampling_params import OutputKind, SamplingParams, SamplingParamsError
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
    grammar: Any = None              # xgrammar.CompiledGrammar of params.structured_outputs, compiled
    grammar_starts_after: tuple[int, ...] = ()   # tokens of structured_outputs.starts_after
    pooling: PoolingParams | None = None     # an embedding request: the prompt is pooled, nothing generated


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
    eos_token_ids: frozenset[int] = frozenset()
    pooler: PoolerConfig | None = None       # set when the engine pools (embeddings) instead of generating
    hidden_size: int = 0


class InputProcessor:
    def __init__(self, tokenizer: Any, limits: ModelLimits, model_defaults: ModelDefaults,
                 defaults: SamplingDefaults) -> None:
        self.tokenizer = tokenizer
        self.limits = limits
        self.model_defaults = model_defaults
        self.sampling_defaults = defaults
        self.grammars = GrammarCompiler(tokenizer, limits.vocab_size, limits.eos_token_ids)

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
        limits = ModelLimits(engine.model_config.vocab_size, engine.max_model_len, engine.config.max_num_seqs,
                             engine.eos_token_ids, engine.pooler_config, engine.model_config.hidden_size)
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
                wait_for_grammar: bool = True) -> EngineRequest:
        """Tokenize and check one request; raises ValueError (naming the field as `param` where there is
        one) for anything the engine could not serve.

        A structured-output request waits here for its grammar, unless `wait_for_grammar` is off: then its
        compile is only started and the caller awaits `grammars.compile_async` (the server does, so a
        slow compile holds no worker thread)."""
        if self.limits.pooler is not None:
            raise ValueError("this model is served for embeddings (--runner pooling): it does not generate text")
        prompt_token_ids = self.tokenize(prompt, add_special_tokens) if isinstance(prompt, str) else list(prompt)
        max_tokens = self.check(prompt_token_ids, params)
        grammar = None
        starts_after: tuple[int, ...] = ()
        spec = params.structured_outputs
        if spec is not None:
            if wait_for_grammar:
                grammar = self.grammars.compile(spec)
            else:
                self.grammars.submit(spec)
            if spec.starts_after:
                starts_after = tuple(self.tokenize(spec.starts_after, add_special_tokens=False))
        return EngineRequest(request_id, prompt if isinstance(prompt, str) else None, prompt_token_ids, params,
                             max_tokens, time.time() if arrival_time is None else arrival_time, grammar,
                             starts_after)

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

    # ---- embeddings -----------------------------------------------------------------------------

    def process_pooling(self, request_id: str, prompt: str | list[int], params: PoolingParams,
                        truncate: int | None = None, keep_end: bool = False, add_special_tokens: bool = True,
                        arrival_time: float | None = None) -> EngineRequest:
        """Tokenize and check one embedding request. `truncate`: at most that many tokens (-1: the context
        length); text is cut by the tokenizer, which keeps its closing special token, unless `keep_end`
        (vLLM's truncate_prompt_tokens: the last tokens). Raises ValueError for anything the engine could
        not serve, as `process` does."""
        pooler = self.limits.pooler
        if pooler is None:
            raise SamplingParamsError("model", "The model does not support Embeddings API: it is served for "
                                               "generation (serve an embedding model, or this one with --runner pooling)")
        self._check_dimensions(params, pooler)
        limit = self.limits.max_model_len if truncate == -1 else truncate
        if limit is not None and limit < 1:
            raise SamplingParamsError("truncate_prompt_tokens", f"truncation must be -1 or positive, got {truncate}")
        if isinstance(prompt, str):
            text = prompt.lower() if pooler.do_lower_case else prompt
            if limit is not None and not keep_end:
                token_ids = self.tokenizer(text, add_special_tokens=add_special_tokens, truncation=True,
                                           max_length=limit)["input_ids"]
            else:
                token_ids = self.tokenize(text, add_special_tokens)
        else:
            token_ids = list(prompt)
        if limit is not None:
            token_ids = token_ids[-limit:] if keep_end else token_ids[:limit]
        if not token_ids:
            raise SamplingParamsError("input", "the input is empty")
        self.check_token_ids(token_ids, "input")
        if len(token_ids) > self.limits.max_model_len:
            raise ValueError(f"This model's maximum context length is {self.limits.max_model_len} tokens. However, "
                             f"you requested {len(token_ids)} tokens in the input for embedding generation. Please "
                             f"reduce the length of the input.")
        return EngineRequest(request_id, prompt if isinstance(prompt, str) else None, token_ids,
                             SamplingParams(max_tokens=1, output_kind=OutputKind.FINAL_ONLY), 1,
                             time.time() if arrival_time is None else arrival_time, params)

    def _check_dimensions(self, params: PoolingParams, pooler: PoolerConfig) -> None:
        if params.dimensions is None:
            return
        if not pooler.is_matryoshka:
            raise SamplingParamsError("dimensions", "Model does not support matryoshka representation, changing "
                                                    "output dimensions will lead to poor results.")
        allowed = pooler.matryoshka_dimensions
        if allowed is not None and params.dimensions not in allowed:
            raise SamplingParamsError("dimensions", f"Model only supports {list(allowed)} matryoshka dimensions, "
                                                    f"using other output dimensions will lead to poor results.")
        if params.dimensions > self.limits.hidden_size:
            raise SamplingParamsError("dimensions", f"dimensions must be at most {self.limits.hidden_size}, "
                                                    f"got {params.dimensions}")
