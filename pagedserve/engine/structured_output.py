"""Structured output: each grammar compiled once, off the step loop, and one matcher per sequence.

`GrammarCompiler` turns a request's `StructuredOutputsParams` into an xgrammar `CompiledGrammar` on its
own worker thread. Identical specs share one compile (a cache of futures keyed by the spec), so fifty
requests with one schema compile it once. The request waits for its grammar in the processor (the
offline `LLM`) or on the event loop (`EngineClient`), never on the step loop: a slow schema delays only
its own request, and one that does not compile within the time limit is refused like a bad schema.

`GrammarMatchers` lives on the engine thread. It holds one matcher per constrained sequence and keeps it
in step with the sequence's output tokens: advanced with each accepted token, and rebuilt from the tokens
whenever the two disagree (so any recompute that keeps the tokens and drops state stays correct). The
sampler asks the matchers for the batch's token bitmask (layers/sampler.py).
"""
from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor, TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

import xgrammar as xgr

from pagedserve.engine.sequence import Sequence
from pagedserve.sampling_params import SamplingParamsError, StructuredOutputsParams

logger = logging.getLogger(__name__)

# A grammar that has not compiled by then is refused (400): nothing waits forever on a pathological schema.
GRAMMAR_COMPILE_TIMEOUT_SECONDS = 30.0
# Compiled grammars kept for reuse (each holds per-token masks: tens of KiB to a few MiB).
_CACHE_SIZE = 256
# Whitespace xgrammar lets the model put between JSON tokens, in one run. Unbounded, a small model can
# fill max_tokens with newlines inside a valid object; this still allows pretty-printed JSON.
_MAX_JSON_WHITESPACE = 16


class GrammarError(SamplingParamsError):
    """The schema, regex or grammar is invalid or did not compile in time (a 400 naming the problem)."""

    def __init__(self, message: str) -> None:
        super().__init__("structured_outputs", message)


class GrammarCompiler:
    """Compiles `StructuredOutputsParams` for one tokenizer, each distinct spec once, on its own thread."""

    def __init__(self, tokenizer: Any, vocab_size: int, stop_token_ids: frozenset[int],
                 timeout_seconds: float = GRAMMAR_COMPILE_TIMEOUT_SECONDS) -> None:
        self.timeout_seconds = timeout_seconds
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._stop_token_ids = sorted(stop_token_ids)
        self._compiler: xgr.GrammarCompiler | None = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[tuple[str, str], Future[xgr.CompiledGrammar]] = OrderedDict()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="pagedserve-grammar")
        self.num_compiles = 0

    def submit(self, spec: StructuredOutputsParams) -> Future[xgr.CompiledGrammar]:
        """The compile of `spec`: a finished future from the cache, or one queued now."""
        with self._lock:
            future = self._cache.get(spec.key)
            if future is not None:
                self._cache.move_to_end(spec.key)
                return future
            future = self._pool.submit(self._compile, spec)
            self._cache[spec.key] = future
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
            return future

    def compile(self, spec: StructuredOutputsParams) -> xgr.CompiledGrammar:
        """Wait (this thread) for the grammar; raises GrammarError if it is invalid or late."""
        try:
            return self.submit(spec).result(self.timeout_seconds)
        except FutureTimeout:
            raise self._late(spec) from None

    async def compile_async(self, spec: StructuredOutputsParams) -> xgr.CompiledGrammar:
        """Wait on the event loop for the grammar; raises GrammarError if it is invalid or late."""
        # NOTE: shielded, so a late request does not cancel the compile other requests share.
        waiter = asyncio.shield(asyncio.wrap_future(self.submit(spec)))
        try:
            return await asyncio.wait_for(waiter, self.timeout_seconds)
        except TimeoutError:
            raise self._late(spec) from None

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _late(self, spec: StructuredOutputsParams) -> GrammarError:
        logger.warning("structured_outputs.%s did not compile within %.0f s; request refused", spec.kind,
                       self.timeout_seconds)
        return GrammarError(f"the structured_outputs {spec.kind} did not compile within "
                            f"{self.timeout_seconds:.0f} s; simplify it")

    def _compile(self, spec: StructuredOutputsParams) -> xgr.CompiledGrammar:
        compiler = self._xgrammar_compiler()
        self.num_compiles += 1
        try:
            return _compile_spec(compiler, spec)
        except GrammarError:
            raise
        except (RuntimeError, ValueError, TypeError, KeyError) as error:
            # xgrammar's messages start with a C++ source location: keep only what names the problem.
            message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            message = message.split("] ", 1)[-1] if message.startswith("[") else message
            message = message.split(": ", 1)[-1] if ".cc:" in message else message
            raise GrammarError(f"invalid structured_outputs {spec.kind}: {message}") from None

    def _xgrammar_compiler(self) -> xgr.GrammarCompiler:
        # Built on first use (on the compile thread): reading the vocabulary takes a tenth of a second.
        if self._compiler is None:
            info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self._vocab_size,
                                                      stop_token_ids=self._stop_token_ids)
            self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        return self._compiler


def _compile_spec(compiler: xgr.GrammarCompiler, spec: StructuredOutputsParams) -> xgr.CompiledGrammar:
    kind, value = spec.kind, spec.value
    if kind == "json":
        schema = json.loads(value) if isinstance(value, str) else value
        _check_json_schema(schema)
        return compiler.compile_json_schema(json.dumps(schema), any_whitespace=True,
                                            max_whitespace_cnt=_MAX_JSON_WHITESPACE)
    if kind == "json_object":
        # OpenAI's json_object (and Ollama's "json") promise an object, not any JSON value.
        return compiler.compile_json_schema('{"type": "object"}', any_whitespace=True,
                                            max_whitespace_cnt=_MAX_JSON_WHITESPACE)
    if kind == "regex":
        return compiler.compile_regex(value)
    if kind == "choice":
        # Each choice as an EBNF string literal (JSON's escaping is the same).
        return compiler.compile_grammar("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in value))
    if kind == "grammar":
        # GBNF/EBNF rules use `::=`; anything else is read as Lark, as vLLM's xgrammar backend does.
        return compiler.compile_grammar(value) if "::=" in value else compiler.compile_lark(value)
    tag = json.loads(value) if isinstance(value, str) else value
    if "structures" in tag:    # vLLM's original form: {"structures": [{begin, schema, end}], "triggers": [...]}
        items = [xgr.StructuralTagItem(begin=s["begin"], schema=json.dumps(s.get("schema", {})), end=s["end"])
                 for s in tag["structures"]]
        return compiler.compile_structural_tag(items, tag.get("triggers", []))
    return compiler.compile_structural_tag(tag)


def _check_json_schema(schema: Any) -> None:
    """A schema the JSON Schema metaschema rejects is named as such (xgrammar would say less)."""
    import jsonschema

    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as error:
        where = "/".join(str(part) for part in error.absolute_path) or "(root)"
        raise GrammarError(f"invalid JSON schema at {where}: {error.message}") from None


@dataclass
class _MatcherState:
    grammar: xgr.CompiledGrammar
    matcher: xgr.GrammarMatcher
    starts_after: tuple[int, ...]    # unconstrained until the output has these tokens (reasoning's end)
    start: int | None                # output index where the constrained part begins, once known
    num_accepted_tokens: int = 0     # of the constrained part
    is_broken: bool = False          # a token was rejected: the constraint is dropped for this sequence
    num_searched: int = 0            # output tokens already searched for starts_after

    def find_start(self, output_token_ids: list[int]) -> int | None:
        if self.start is None:
            marker, size = list(self.starts_after), len(self.starts_after)
            first = max(0, self.num_searched - size + 1)
            self.num_searched = len(output_token_ids)
            for index in range(first, len(output_token_ids) - size + 1):
                if output_token_ids[index:index + size] == marker:
                    self.start = index + size
                    break
        return self.start


class GrammarMatchers:
    """One matcher per constrained sequence, in step with its output tokens. Engine thread only."""

    def __init__(self) -> None:
        self._states: dict[int, _MatcherState] = {}
        self.num_rebuilds = 0

    def __len__(self) -> int:
        return len(self._states)

    def add(self, seq_id: int, grammar: xgr.CompiledGrammar, starts_after: tuple[int, ...] = ()) -> None:
        self._states[seq_id] = _MatcherState(grammar, xgr.GrammarMatcher(grammar), starts_after,
                                             None if starts_after else 0)

    def remove(self, seq_ids: tuple[int, ...]) -> None:
        for seq_id in seq_ids:
            self._states.pop(seq_id, None)

    def matcher_for(self, seq: Sequence) -> xgr.GrammarMatcher | None:
        """The sequence's matcher, advanced to its output so far; None when it is unconstrained."""
        state = self._states.get(seq.seq_id)
        if state is None or state.is_broken:
            return None
        start = state.find_start(seq.output_token_ids)
        if start is None:
            return None       # still reasoning
        if state.matcher.is_terminated():
            return None       # complete (the engine stops such a sequence; xgrammar has no mask past the end)
        if state.num_accepted_tokens != seq.num_output_tokens - start:
            self._rebuild(state, seq, start)
        return None if state.is_broken else state.matcher

    def accept(self, seq: Sequence) -> None:
        """Advance the matcher by the token just appended to `seq`."""
        state = self._states.get(seq.seq_id)
        if state is None or state.is_broken or state.start is None or \
                state.num_accepted_tokens != seq.num_output_tokens - state.start - 1:
            return    # not constrained yet, or out of step: matcher_for rebuilds it before it is used again
        self._advance(state, seq, seq.token_ids[-1])

    def is_terminated(self, seq: Sequence) -> bool:
        """Whether the sequence's grammar accepted its end: the answer is complete."""
        state = self._states.get(seq.seq_id)
        return state is not None and not state.is_broken and state.matcher.is_terminated()

    def _rebuild(self, state: _MatcherState, seq: Sequence, start: int) -> None:
        self.num_rebuilds += 1
        state.matcher = xgr.GrammarMatcher(state.grammar)
        state.num_accepted_tokens = 0
        for token_id in seq.output_token_ids[start:]:
            if not self._advance(state, seq, token_id):
                return

    def _advance(self, state: _MatcherState, seq: Sequence, token_id: int) -> bool:
        if state.matcher.is_terminated() or state.matcher.accept_token(token_id):
            state.num_accepted_tokens += 1
            return True
        # Only reachable when every token was masked (e.g. min_tokens banned the only allowed end).
        logger.warning("request %s: token %d breaks its grammar; the rest of the sequence is unconstrained",
                       seq.request_id, token_id)
        state.is_broken = True
        return False
