"""Splitting a model's `<think>…</think>` reasoning from its answer, whole or as it streams.

Two parsers, named as vLLM names them (`--reasoning-parser`):

  deepseek_r1  Everything before `</think>` is reasoning, whether or not the output opens with
               `<think>` (R1 chat templates open it in the prompt). No `</think>` at all: all of it
               is reasoning, as vLLM does.
  qwen3        Reasoning only when thinking is on: the output opens `<think>` or the prompt ends with
               it. Qwen3 with thinking disabled emits no tags, and then everything is content.
               After `<think>` without `</think>` (a truncated answer), everything is reasoning.

The tags are matched in the text, not as token ids, so a model without `<think>` special tokens
works too, and a tag split across streamed pieces ("</th" + "ink>") is held back until it is
complete. Streaming and whole-text parsing share one state machine, so they always agree.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum

from pagedserve.config import REASONING_PARSERS
from pagedserve.sampling_params import SamplingParams

THINK_START = "<think>"
THINK_END = "</think>"


class _State(Enum):
    BEFORE = "before"          # no reasoning yet; watching for <think> (qwen3)
    REASONING = "reasoning"    # inside <think>; watching for </think>
    CONTENT = "content"        # after </think>: the rest is the answer, verbatim


@dataclass(frozen=True)
class ReasoningDelta:
    """What one streamed piece adds to each side; empty strings when nothing (yet)."""

    reasoning: str = ""
    content: str = ""


class ReasoningParser:
    """One output's parser. `feed()` each streamed piece, then `finish()` once."""

    def __init__(self, name: str, prompt: str = "") -> None:
        if name not in REASONING_PARSERS:
            raise ValueError(f"unknown reasoning parser {name!r}; choose one of {', '.join(REASONING_PARSERS)}")
        opens_in_prompt = prompt.rstrip().endswith(THINK_START)
        starts_reasoning = name == "deepseek_r1" or opens_in_prompt
        self._state = _State.REASONING if starts_reasoning else _State.BEFORE
        self.has_reasoning = starts_reasoning
        self._pending = ""

    def feed(self, text: str) -> ReasoningDelta:
        self._pending += text
        reasoning: list[str] = []
        content: list[str] = []
        while self._pending:
            if self._state is _State.CONTENT:
                content.append(self._pending)
                self._pending = ""
                break
            sink = reasoning if self._state is _State.REASONING else content
            tags = (THINK_END, THINK_START) if self._state is _State.REASONING else (THINK_START,)
            found = [(index, tag) for tag in tags if (index := self._pending.find(tag)) != -1]
            if not found:
                keep = _partial_tag_length(self._pending, tags)
                sink.append(self._pending[:len(self._pending) - keep])
                self._pending = self._pending[len(self._pending) - keep:]
                break
            index, tag = min(found)
            sink.append(self._pending[:index])
            self._pending = self._pending[index + len(tag):]
            self._advance(tag)
        return ReasoningDelta("".join(reasoning), "".join(content))

    def split(self, text: str, is_finished: bool) -> ReasoningDelta:
        """What one streamed piece adds to each side; with `is_finished`, also what was held back."""
        delta = self.feed(text)
        if not is_finished:
            return delta
        rest = self.finish()
        return ReasoningDelta(delta.reasoning + rest.reasoning, delta.content + rest.content)

    def finish(self) -> ReasoningDelta:
        """Whatever was held back as a possible tag start goes to the side it was on."""
        rest, self._pending = self._pending, ""
        if self._state is _State.REASONING:
            return ReasoningDelta(reasoning=rest)
        return ReasoningDelta(content=rest)

    def _advance(self, tag: str) -> None:
        if tag == THINK_END:
            self._state = _State.CONTENT
        elif self._state is _State.BEFORE:
            self._state = _State.REASONING
            self.has_reasoning = True
        # NOTE: a <think> inside reasoning (R1's own opening tag) is dropped and changes nothing.


def split_reasoning(name: str, text: str, prompt: str = "") -> tuple[str | None, str | None]:
    """(reasoning, content) of a whole output, as vLLM reports them: reasoning None when the model
    did not reason; content None when reasoning took all of it."""
    parser = ReasoningParser(name, prompt)
    piece = parser.split(text, is_finished=True)
    if not parser.has_reasoning:
        return None, piece.content
    return piece.reasoning, piece.content or None


def _partial_tag_length(text: str, tags: tuple[str, ...]) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of one of `tags`."""
    longest = 0
    for tag in tags:
        for length in range(min(len(tag) - 1, len(text)), longest, -1):
            if text.endswith(tag[:length]):
                longest = length
                break
    return longest


def grammar_after_reasoning(params: SamplingParams, parser_name: str | None, prompt: str) -> SamplingParams:
    """A structured-output request to a model that reasons first: the grammar starts after `</think>`
    (as vLLM does), so the thinking stays free and the answer follows the schema."""
    spec = params.structured_outputs
    if spec is None or parser_name is None or not ReasoningParser(parser_name, prompt).has_reasoning:
        return params
    return params.replace(structured_outputs=dataclasses.replace(spec, starts_after=THINK_END))
