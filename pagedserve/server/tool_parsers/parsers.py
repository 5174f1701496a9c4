"""The tool-call formats models write, each as an `extract(region, is_finished)` over the text from the
first tool-call marker on. Named as vLLM names them (`--tool-call-parser`):

  hermes       <tool_call>{"name": ..., "arguments": {...}}</tool_call>, repeated (Qwen2.5/3, Hermes, SmolLM)
  llama3_json  {"name": ..., "parameters": {...}}, optionally after <|python_tag|>, several joined by ";"
  mistral      [TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]  or  [TOOL_CALLS]name[ARGS]{...}
  pythonic     [get_weather(city="Paris"), other(x=1)]  (Llama 3.2/4 style Python call lists)

and, not a flag, the generic format for chat templates without a tools section (llama-server's): a grammar
makes the whole answer {"tool_calls": [{"name": ..., "arguments": {...}}, ...]}, {"tool_call": {...}} or
{"response": ...}.

An extract returns the calls complete so far and, for the JSON formats, the call still being written
(its name once known and its arguments so far), so argument text streams as it is generated.
"""
from __future__ import annotations

import ast
import json
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass

_NAME = re.compile(r'\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"')
_ARGUMENTS_KEY = re.compile(r'"(?:arguments|parameters)"\s*:\s*')


@dataclass(frozen=True)
class ParsedCall:
    name: str
    arguments: str                 # JSON text of the arguments object


@dataclass(frozen=True)
class PartialCall:
    """A call still being written: its name once complete, and the arguments' text so far."""

    name: str | None
    arguments: str = ""


@dataclass(frozen=True)
class Extracted:
    calls: list[ParsedCall]
    partial: PartialCall | None = None
    # The answer's content so far when the format wraps it (the generic format's "response"); it only grows.
    content: str | None = None


class ToolParser(ABC):
    """A format: where its tool calls start in the output, and how to read them."""

    markers: tuple[str, ...] = ()          # text that opens the tool calls
    leading: tuple[str, ...] = ()          # what opens them when it begins the output (after whitespace)

    def find_start(self, text: str) -> int | None:
        found = [index for marker in self.markers if (index := text.find(marker)) != -1]
        if found:
            return min(found)
        stripped = text.lstrip()
        if self.leading and stripped[:1] in self.leading:
            return len(text) - len(stripped)
        return None

    def held_back(self, text: str) -> int:
        """How many trailing characters could still become the start of tool calls (not yet content)."""
        if self.leading and not text.strip():
            return len(text)
        for length in range(min(len(text), max((len(m) for m in self.markers), default=0)), 0, -1):
            if any(marker.startswith(text[-length:]) for marker in self.markers):
                return length
        return 0

    @abstractmethod
    def extract(self, region: str, is_finished: bool) -> Extracted:
        """The calls in `region` (the text from where find_start pointed), complete and in progress."""


class HermesParser(ToolParser):
    markers = ("<tool_call>",)
    _end = "</tool_call>"

    def extract(self, region: str, is_finished: bool) -> Extracted:
        calls: list[ParsedCall] = []
        position = 0
        while (start := region.find(self.markers[0], position)) != -1:
            body_start = start + len(self.markers[0])
            end = region.find(self._end, body_start)
            body = region[body_start:] if end == -1 else region[body_start:end]
            if body.lstrip().startswith("["):    # SmolLM2's form: a JSON list of calls inside one tag
                objects = json_objects(body.lstrip()[1:], separators=" \t\r\n,]")
            else:
                objects = json_objects(body, separators=" \t\r\n")
            calls.extend(call for call in map(object_call, objects.complete) if call is not None)
            if end == -1:
                return Extracted(calls, partial_call(objects.partial))
            position = end + len(self._end)
        return Extracted(calls)


class Llama3JsonParser(ToolParser):
    markers = ("<|python_tag|>",)
    leading = ("{",)

    def extract(self, region: str, is_finished: bool) -> Extracted:
        body = region.split(self.markers[0], 1)[1] if region.startswith(self.markers[0]) else region
        objects = json_objects(body, separators=" \t\r\n;")
        return Extracted([c for c in map(object_call, objects.complete) if c is not None],
                         partial_call(objects.partial))


class MistralParser(ToolParser):
    markers = ("[TOOL_CALLS]",)

    def extract(self, region: str, is_finished: bool) -> Extracted:
        calls: list[ParsedCall] = []
        partial: PartialCall | None = None
        for piece in region.split(self.markers[0])[1:]:
            stripped = piece.lstrip()
            if stripped.startswith("["):     # a JSON list of {"name", "arguments"}
                objects = json_objects(stripped[1:], separators=" \t\r\n,]")
                calls.extend(c for c in map(object_call, objects.complete) if c is not None)
                partial = partial_call(objects.partial)
            elif "[ARGS]" in piece:           # name[ARGS]{...} (Mistral's v11 tokenizer)
                name, arguments = piece.split("[ARGS]", 1)
                end = json_value_end(arguments.lstrip(), 0)
                text = arguments.lstrip()
                if end is None:
                    partial = PartialCall(name.strip(), text)
                else:
                    calls.append(ParsedCall(name.strip(), text[:end]))
                    partial = None
        return Extracted(calls, partial)


class PythonicParser(ToolParser):
    leading = ("[",)

    def extract(self, region: str, is_finished: bool) -> Extracted:
        text = region.strip()
        if not text.endswith("]"):
            return Extracted([])
        try:
            tree = ast.parse(text, mode="eval").body
        except SyntaxError:
            return Extracted([])
        if not isinstance(tree, ast.List) or not all(isinstance(e, ast.Call) for e in tree.elts):
            return Extracted([])
        calls = []
        for element in tree.elts:
            assert isinstance(element, ast.Call)
            try:
                arguments = {kw.arg: ast.literal_eval(kw.value) for kw in element.keywords if kw.arg}
            except ValueError:
                return Extracted([])
            name = ast.unparse(element.func)
            calls.append(ParsedCall(name, json.dumps(arguments, ensure_ascii=False)))
        return Extracted(calls)


class JsonListParser(ToolParser):
    """What tool_choice "required" makes the model write (a JSON list of {"name", "parameters"}, by grammar)."""

    leading = ("[",)

    def extract(self, region: str, is_finished: bool) -> Extracted:
        objects = json_objects(region.lstrip()[1:], separators=" \t\r\n,]")
        return Extracted([c for c in map(object_call, objects.complete) if c is not None],
                         partial_call(objects.partial))


class GenericJsonParser(ToolParser):
    """The generic format: the whole answer is one JSON object, calls or a response (by grammar)."""

    leading = ("{",)

    def extract(self, region: str, is_finished: bool) -> Extracted:
        key = _GENERIC_KEY.match(region)
        if key is None:
            return Extracted([])
        rest = region[key.end():]
        if key.group(1) == "response":
            if rest.startswith('"'):
                return Extracted([], content=json_string_prefix(rest[1:]))
            if rest[:1] in ("{", "["):        # a response schema's object or array: its JSON text as written
                return Extracted([], content=rest[:json_value_end(rest, 0)])
            return Extracted([], content=rest.rstrip().removesuffix("}").rstrip() if is_finished else "")
        if key.group(1) == "tool_calls":
            if not rest.startswith("["):
                return Extracted([])
            objects = json_objects(rest[1:], separators=" \t\r\n,]")
        else:
            objects = json_objects(rest, separators=" \t\r\n}")
        return Extracted([c for c in map(object_call, objects.complete) if c is not None],
                         partial_call(objects.partial))


_GENERIC_KEY = re.compile(r'\{\s*"(tool_calls|tool_call|response)"\s*:\s*')
_HIGH_SURROGATE = ("d8", "d9", "da", "db")


TOOL_PARSERS: dict[str, type[ToolParser]] = {
    "hermes": HermesParser, "llama3_json": Llama3JsonParser, "mistral": MistralParser, "pythonic": PythonicParser,
}


# ---- JSON pieces ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Objects:
    complete: list[str]
    partial: str | None            # an object still open at the end of the text


def json_objects(text: str, separators: str) -> _Objects:
    """The JSON objects in `text`, one after another with only `separators` between them."""
    complete: list[str] = []
    position = 0
    while position < len(text):
        if text[position] in separators:
            position += 1
            continue
        if text[position] != "{":
            break
        end = json_value_end(text, position)
        if end is None:
            return _Objects(complete, text[position:])
        complete.append(text[position:end])
        position = end
    return _Objects(complete, None)


def json_string_prefix(text: str) -> str:
    """The characters of a JSON string written so far: `text` follows its opening quote; an escape not
    finished yet (or half of a surrogate pair) waits for the rest."""
    index = 0
    while index < len(text):
        char = text[index]
        if char == '"':
            break
        if char == "\\":
            size = 6 if text[index + 1:index + 2] == "u" else 2
            if size == 6 and text[index + 2:index + 4].lower() in _HIGH_SURROGATE:
                size = 12
            if index + size > len(text):
                break
            index += size
        else:
            index += 1
    try:
        return str(json.loads('"' + text[:index] + '"', strict=False))
    except ValueError:
        return text[:index]


def json_value_end(text: str, start: int) -> int | None:
    """Index just after the object or array opening at `start`; None when it is not closed yet."""
    depth = 0
    in_string = is_escaped = False
    for index in range(start, len(text)):
        char = text[index]
        if in_string:
            if is_escaped:
                is_escaped = False
            elif char == "\\":
                is_escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "{[":
            depth += 1
        elif char in "}]":
            depth -= 1
            if depth == 0:
                return index + 1
    return None


def object_call(text: str) -> ParsedCall | None:
    """A complete {"name": ..., "arguments"|"parameters": {...}} object as a call (None if it is not one)."""
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get("arguments", value.get("parameters", {}))
    if isinstance(arguments, str):      # some models write the arguments as a JSON string
        return ParsedCall(value["name"], arguments)
    key = _ARGUMENTS_KEY.search(text)
    if key is not None and text[key.end():key.end() + 1] == "{":
        end = json_value_end(text, key.end())
        if end is not None:
            # NOTE: the model's own text, so streamed pieces of it add up to exactly this.
            return ParsedCall(value["name"], text[key.end():end])
    return ParsedCall(value["name"], json.dumps(arguments, ensure_ascii=False))


def partial_call(text: str | None) -> PartialCall | None:
    """The name (once written) and the arguments so far of an object still open."""
    if text is None:
        return None
    name = _NAME.match(text)
    if name is None:
        return PartialCall(None)
    key = _ARGUMENTS_KEY.search(text, name.end())
    if key is None or text[key.end():key.end() + 1] != "{":
        return PartialCall(json.loads(f'"{name.group(1)}"'))
    end = json_value_end(text, key.end())
    return PartialCall(json.loads(f'"{name.group(1)}"'), text[key.end():end])
