"""From what a client sends to what the engine runs: chat prompts rendered, prompts tokenized, requests
checked against the model once, sampling defaults applied.

The processor holds the tokenizer and the model's limits but no engine state, so it runs wherever the
request arrives (the server's worker threads, the offline `LLM`'s caller), never on the step loop. What it
hands on, an `EngineRequest`, is plain data the engine queues without looking again.
"""
from __future__ import annotations

import json
import logging
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from types import FrameType
from typing import Any, Callable, Iterator, Mapping

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


# A prompt longer than this many characters per token of the context cannot fit, for text as people
# write it (about 4 characters a token in English, fewer in code and CJK): such a prompt is refused
# before it is tokenized, which for megabytes of text takes the worker seconds. (A tokenizer's longest
# tokens are longer, runs of '=' or spaces, but no prompt that fits the context is made of them alone.)
MAX_CHARS_PER_TOKEN = 16
# How long a chat template may render (checked between template statements): a model's own template
# takes milliseconds, even for long conversations.
TEMPLATE_TIME_LIMIT_SECONDS = 5.0


class PromptTooLongError(SamplingParamsError):
    pass


@dataclass(frozen=True)
class ModelLimits:
    """What a request is checked against."""

    vocab_size: int
    max_model_len: int
    max_num_seqs: int
    eos_token_ids: frozenset[int] = frozenset()
    pooler: PoolerConfig | None = None       # set when the engine pools (embeddings) instead of generating
    hidden_size: int = 0

    @property
    def max_prompt_chars(self) -> int:
        """The longest prompt text (or rendered chat) that is tokenized at all."""
        return self.max_model_len * MAX_CHARS_PER_TOKEN


class InputProcessor:
    def __init__(self, tokenizer: Any, limits: ModelLimits, model_defaults: ModelDefaults,
                 defaults: SamplingDefaults, default_max_tokens: int | None = None) -> None:
        """`default_max_tokens`: the output cap of a request that sets none (None: up to the context)."""
        self.tokenizer = tokenizer
        self.limits = limits
        self.model_defaults = model_defaults
        self.sampling_defaults = defaults
        self.grammars = GrammarCompiler(tokenizer, limits.vocab_size, limits.eos_token_ids)
        self.default_max_tokens = default_max_tokens

    @classmethod
    def for_engine(cls, engine: Any, model_defaults: ModelDefaults = ModelDefaults(), *,
                   sampling_overrides: Mapping[str, Any] | None = None,
                   use_generation_config: bool = True, default_max_tokens: int | None = None) -> InputProcessor:
        """The processor for a loaded LLMEngine, with the created model's defaults (if any) over the
        checkpoint's generation_config.json, and `sampling_overrides` over both."""
        return cls.for_model(engine.config.model, engine.tokenizer, engine.model_limits(), engine.generation_config,
                             model_defaults, sampling_overrides=sampling_overrides,
                             use_generation_config=use_generation_config, default_max_tokens=default_max_tokens)

    @classmethod
    def for_model(cls, model: str, tokenizer: Any, limits: ModelLimits, generation_config: dict[str, Any],
                  model_defaults: ModelDefaults = ModelDefaults(), *,
                  sampling_overrides: Mapping[str, Any] | None = None, use_generation_config: bool = True,
                  default_max_tokens: int | None = None) -> InputProcessor:
        """As for_engine, from what an engine reports of itself (a data parallel replica in another process)."""
        defaults = sampling_defaults(generation_config, model_defaults, sampling_overrides, use_generation_config)
        if defaults:
            logger.info("%s: sampling defaults for fields a request leaves out: %s", model, dict(defaults.values))
        return cls(tokenizer, limits, model_defaults, defaults, default_max_tokens)

    # ---- text <-> tokens ------------------------------------------------------------------------

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Raises ValueError for text that is not Unicode (a lone surrogate: the Rust tokenizer takes
        only what UTF-8 can encode, and would raise a TypeError)."""
        self._check_length(len(text), "prompt")
        _check_encodable(text)
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def _check_length(self, num_chars: int, what: str) -> None:
        limit = self.limits.max_prompt_chars
        if num_chars > limit:
            raise PromptTooLongError("prompt", f"the {what} has {num_chars} characters, more than could fit in this "
                                               f"model's maximum context length of {self.limits.max_model_len} "
                                               f"tokens (at most {limit} characters are tokenized). Please reduce "
                                               f"the length of the {what}.")

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
        # NOTE: the messages' JSON size bounds their text (the template adds little), so a conversation
        # that could not fit is refused before it is rendered.
        self._check_length(len(json.dumps([messages, options.tools], ensure_ascii=False)), "conversation")
        if options.chat_template is not None:
            check_template_constants(options.chat_template, self.limits.max_prompt_chars)
        with time_limit(TEMPLATE_TIME_LIMIT_SECONDS):
            text = render_chat_prompt(self.tokenizer, messages, add_generation_prompt=options.add_generation_prompt,
                                      continue_final_message=options.continue_final_message,
                                      chat_template=options.chat_template, tools=options.tools,
                                      chat_template_kwargs=options.chat_template_kwargs)
        self._check_length(len(text), "rendered conversation")
        return ChatPrompt(text, self.tokenize(text, add_special_tokens=options.add_special_tokens))

    # ---- checks ---------------------------------------------------------------------------------

    def check_token_ids(self, token_ids: list[int], param: str) -> None:
        vocab_size = self.limits.vocab_size
        bad = [token_id for token_id in token_ids if not 0 <= token_id < vocab_size]
        if bad:
            raise SamplingParamsError(param, f"token ids must be in [0, {vocab_size}); got {bad[0]}")

    def process(self, request_id: str, prompt: str | list[int], params: SamplingParams,
                add_special_tokens: bool = True, arrival_time: float | None = None,
                wait_for_grammar: bool = True, lora_name: str | None = None) -> EngineRequest:
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
                             starts_after, lora_name=lora_name)

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
            room = max_model_len - num_prompt
            return room if self.default_max_tokens is None else min(room, self.default_max_tokens)
        if num_prompt + params.max_tokens > max_model_len:
            raise ValueError(f"This model's maximum context length is {max_model_len} tokens. However, you "
                             f"requested {num_prompt + params.max_tokens} tokens ({num_prompt} in the prompt, "
                             f"{params.max_tokens} in the completion). Please reduce the length of the prompt "
                             f"or completion.")
        return params.max_tokens

    # ---- embeddings -----------------------------------------------------------------------------

    def process_pooling(self, request_id: str, prompt: str | list[int], params: PoolingParams,
                        truncate: int | None = None, keep_end: bool = False, add_special_tokens: bool = True,
                        arrival_time: float | None = None, lora_name: str | None = None) -> EngineRequest:
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
                             time.time() if arrival_time is None else arrival_time, pooling=params,
                             lora_name=lora_name)

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

def _check_encodable(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise SamplingParamsError("prompt", f"the prompt holds a lone UTF-16 surrogate (\\u{ord(text[error.start]):04x}) "
                                            f"at character {error.start}, which is no Unicode character") from None


class TemplateTimeoutError(ValueError):
    pass


# What jinja names the code it compiles a template string into.
_TEMPLATE_FILENAME = "<template>"
_Tracer = Callable[[FrameType, str, Any], Any]


@contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Chat templates rendered inside end with TemplateTimeoutError (a ValueError: the template's
    fault) once `seconds` are up.

    NOTE: a template is Python code jinja compiled; a trace function on this thread, set only for
    the template's own frames, checks the clock at each of its lines (loop turns included), so a
    template looping for minutes stops within the limit. One long C call (a huge string repeat) is
    not interrupted: the rendered text's length check refuses its result.
    """
    deadline = time.monotonic() + seconds

    def check_line(frame: FrameType, event: str, arg: Any) -> _Tracer | None:
        if time.monotonic() > deadline:
            raise TemplateTimeoutError(f"the chat template took more than {seconds:g} s to render")
        return check_line

    def trace_templates(frame: FrameType, event: str, arg: Any) -> _Tracer | None:
        return check_line if frame.f_code.co_filename == _TEMPLATE_FILENAME else None

    previous = sys.gettrace()
    sys.settrace(trace_templates)
    try:
        yield
    finally:
        sys.settrace(previous)


def check_template_constants(template: str, limit: int) -> None:
    """ValueError for a template with a product, power or filter argument bigger than `limit` when
    constant (`'x' * 10**8`).

    NOTE: jinja folds constant expressions while it compiles a template, and writes the result into
    the Python code it then compiles: a huge one holds the interpreter for seconds before rendering
    (and the time limit) begins. So a request's template is read first, each product, power and
    number bounded without computing it.
    """
    from jinja2 import nodes
    from jinja2.exceptions import TemplateSyntaxError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    try:
        tree = ImmutableSandboxedEnvironment().parse(template)
    except TemplateSyntaxError as error:
        raise ValueError(f"chat template failed: {error}") from None
    for node in tree.find_all((nodes.Mul, nodes.Pow, nodes.Filter)):
        # a filter with constant arguments is folded too ('x'|center(10**8))
        parts = [*node.args, *(pair.value for pair in node.kwargs)] if isinstance(node, nodes.Filter) else [node]
        size = max((_constant_size(part) or 0.0 for part in parts), default=0.0)
        if size > limit:
            raise ValueError(f"the chat template holds a constant expression of size {size:.3g} (line {node.lineno}), "
                             f"more than the {limit} characters a prompt may have")


def _constant_size(node: Any) -> float | None:
    """A bound on the length (sequences) or magnitude (numbers) of a constant expression; None if it
    is not constant."""
    from jinja2 import nodes

    if isinstance(node, nodes.Const):
        value = node.value
        if isinstance(value, bool) or value is None:
            return 1.0
        if isinstance(value, (int, float)):
            return float(abs(value))
        return float(len(value)) if isinstance(value, (str, tuple, list)) else None
    if isinstance(node, (nodes.Mul, nodes.Pow, nodes.Add, nodes.Sub)):
        left, right = _constant_size(node.left), _constant_size(node.right)
        if left is None or right is None:
            return None
        if isinstance(node, nodes.Pow):
            return 1.0 if left <= 1 else math.inf if right * math.log2(left) > 1000 else left ** right
        return left * right if isinstance(node, nodes.Mul) else left + right
    if isinstance(node, (nodes.Neg, nodes.Pos)):
        return _constant_size(node.node)
    return None
