"""Tool calls out of a model's text, whole or as it streams, in the formats of `parsers.py`.

`ToolCallStream` is one output's state: `feed()` each streamed piece and get back the content to send
and the tool-call deltas, as OpenAI streams them (the first delta of a call carries its index, id,
type and name with empty arguments; later ones only argument text, in order). `parse_tool_calls` is
the same machine run over the whole text, so whole and streamed answers always agree. Text that
opens like a tool call but never becomes one is given back as content.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from pagedserve.server.tool_parsers.parsers import (TOOL_PARSERS, Extracted, GenericJsonParser, JsonListParser,
                                                    ParsedCall, PartialCall, ToolParser)

__all__ = ["TOOL_PARSERS", "GenericJsonParser", "JsonListParser", "NamedToolParser", "ToolCall", "ToolCallStream",
           "ToolParser", "make_parser", "parse_tool_calls"]


def new_call_id() -> str:
    return f"chatcmpl-tool-{uuid.uuid4().hex}"


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str                 # JSON text

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


class NamedToolParser(ToolParser):
    """tool_choice naming one function: the grammar makes the whole output that function's arguments."""

    def __init__(self, name: str) -> None:
        self.name = name

    def find_start(self, text: str) -> int | None:
        return 0

    def held_back(self, text: str) -> int:
        return 0

    def extract(self, region: str, is_finished: bool) -> Extracted:
        if is_finished:
            return Extracted([ParsedCall(self.name, region.strip())])
        return Extracted([], PartialCall(self.name, region.lstrip()))


def make_parser(name: str) -> ToolParser:
    return TOOL_PARSERS[name]()


@dataclass
class _SentCall:
    id: str
    name: str
    arguments: str = ""            # sent so far


@dataclass
class StreamDelta:
    content: str = ""
    tool_calls: list[dict[str, Any]] = field(default_factory=list)   # OpenAI's delta.tool_calls items


class ToolCallStream:
    """One output's tool-call parsing as it streams."""

    def __init__(self, parser: ToolParser, max_calls: int | None = None) -> None:
        self.parser = parser
        self.max_calls = max_calls           # parallel_tool_calls false: only the first call
        self.text = ""
        self._num_content_chars = 0
        self._num_wrapped_chars = 0          # of a format's wrapped content (Extracted.content) sent
        self._region_start: int | None = None
        self.sent: list[_SentCall] = []
        self.calls: list[ToolCall] = []      # complete, in order

    @property
    def has_calls(self) -> bool:
        return bool(self.sent)

    def feed(self, piece: str, is_finished: bool) -> StreamDelta:
        self.text += piece
        delta = StreamDelta()
        if self._region_start is None:
            start = self.parser.find_start(self.text)
            if start is None:
                safe = len(self.text) if is_finished else len(self.text) - self.parser.held_back(self.text)
                delta.content = self.text[self._num_content_chars:safe]
                self._num_content_chars = max(self._num_content_chars, safe)
                return delta
            self._region_start = start
            delta.content = self.text[self._num_content_chars:start]
            self._num_content_chars = start
        extracted = self.parser.extract(self.text[self._region_start:], is_finished)
        if extracted.content is not None:
            delta.content += extracted.content[self._num_wrapped_chars:]
            self._num_wrapped_chars = max(self._num_wrapped_chars, len(extracted.content))
        for index, call in enumerate(extracted.calls):
            self._send(delta, index, call.name, call.arguments)
            if index == len(self.calls):
                self.calls.append(ToolCall(self.sent[index].id, call.name, call.arguments))
        partial = extracted.partial
        if partial is not None and partial.name is not None:
            self._send(delta, len(extracted.calls), partial.name, partial.arguments)
        if self.max_calls is not None:
            delta.tool_calls = [item for item in delta.tool_calls if item["index"] < self.max_calls]
            self.calls = self.calls[:self.max_calls]
        if is_finished and not self.sent and extracted.content is None:
            # It looked like a tool call and never became one: it was content after all.
            delta.content += self.text[self._num_content_chars:]
            self._num_content_chars = len(self.text)
        return delta

    def _send(self, delta: StreamDelta, index: int, name: str, arguments: str) -> None:
        if index == len(self.sent):
            self.sent.append(_SentCall(new_call_id(), name))
            delta.tool_calls.append({"index": index, "id": self.sent[index].id, "type": "function",
                                     "function": {"name": name, "arguments": ""}})
        sent = self.sent[index]
        # NOTE: arguments only grow (each is the model's own text so far), so the deltas add up to the call's.
        if len(arguments) > len(sent.arguments) and arguments.startswith(sent.arguments):
            delta.tool_calls.append({"index": index, "function": {"arguments": arguments[len(sent.arguments):]}})
            sent.arguments = arguments


def parse_tool_calls(parser: ToolParser, text: str, max_calls: int | None = None) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a whole output; content None when it was all tool calls (as OpenAI sends it)."""
    stream = ToolCallStream(parser, max_calls)
    delta = stream.feed(text, is_finished=True)
    content = delta.content
    if stream.calls:
        content = content.strip()
    return content or (None if stream.calls else content), stream.calls
