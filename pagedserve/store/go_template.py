"""Ollama's legacy Go prompt templates (`{{ .System }}`, `{{ .Prompt }}`, `{{ .Response }}`) as Jinja
chat templates, so a Modelfile written for Ollama keeps its TEMPLATE.

Ollama renders such a template once per conversation turn — (system, prompt, response) — and the
last turn only up to `{{ .Response }}`, where the model's answer starts. The Jinja produced here
does the same over `messages`. Only the simple forms are translated: the three fields, `if`/`else`/
`end` on them, `{{-`/`-}}` whitespace trimming and comments. Anything else (`.Messages`, `range`,
functions) raises ValueError: such a template has to be rewritten as Jinja.
"""
from __future__ import annotations

import json
import re

_FIELDS = {".System": "System", ".Prompt": "Prompt", ".Response": "Response"}
_ACTION = re.compile(r"\{\{(-\s)?(.*?)(\s-)?\}\}", re.DOTALL)
_GO_FIELD = re.compile(r"\{\{-?\s*(if\s+|range\s+|with\s+)?\$?\.[A-Z]")

# Ollama's turn loop (template.go, Execute without .Messages): merge consecutive messages of one role,
# flush a turn when a new one starts, and render the last turn cut at the response.
_LOOP = (
    "{% set ns = namespace(system='', prompt='', response='') %}"
    "{% for message in messages %}"
    "{% set content = message['content'] if message['content'] is string else '' %}"
    "{% if message['role'] == 'system' %}"
    "{% if ns.prompt or ns.response %}{{ turn(ns.system, ns.prompt, ns.response) }}"
    "{% set ns.system = '' %}{% set ns.prompt = '' %}{% set ns.response = '' %}{% endif %}"
    "{% set ns.system = (ns.system ~ '\\n\\n' ~ content) if ns.system else content %}"
    "{% elif message['role'] == 'user' %}"
    "{% if ns.response %}{{ turn(ns.system, ns.prompt, ns.response) }}"
    "{% set ns.system = '' %}{% set ns.prompt = '' %}{% set ns.response = '' %}{% endif %}"
    "{% set ns.prompt = (ns.prompt ~ '\\n\\n' ~ content) if ns.prompt else content %}"
    "{% elif message['role'] == 'assistant' %}"
    "{% set ns.response = (ns.response ~ '\\n\\n' ~ content) if ns.response else content %}"
    "{% endif %}"
    "{% endfor %}"
    "{{ head(ns.system, ns.prompt) }}{{ ns.response }}"
)


def is_go_template(template: str) -> bool:
    """True when the template uses Go's `{{ .Field }}` syntax rather than Jinja's."""
    return bool(_GO_FIELD.search(template))


def translate_go_template(template: str, add_bos: bool = False) -> str:
    """The Jinja chat template that renders like Ollama renders `template`.

    `add_bos`: start with the tokenizer's BOS token, which llama.cpp adds for models that want one
    (the server encodes rendered prompts without adding special tokens).
    """
    pieces = _pieces(template)
    full = _jinja_body(pieces)
    head = _jinja_body(_cut_at_response(pieces))
    bos = "{{ bos_token }}" if add_bos else ""
    return (f"{{% macro turn(System, Prompt, Response) %}}{full}{{% endmacro %}}"
            f"{{% macro head(System, Prompt) %}}{head}{{% endmacro %}}{bos}{_LOOP}")


def _pieces(template: str) -> list[tuple[str, str]]:
    """("text", literal) and ("action", words) in order, with Go's trim markers applied to the text."""
    pieces: list[tuple[str, str]] = []
    position, trim_next = 0, False
    for match in _ACTION.finditer(template):
        text = template[position:match.start()]
        if trim_next:
            text = text.lstrip(" \t\r\n")
        if match[1]:
            text = text.rstrip(" \t\r\n")
        pieces.append(("text", text))
        pieces.append(("action", _check_action(match[2].strip(), match[0])))
        position, trim_next = match.end(), bool(match[3])
    tail = template[position:]
    pieces.append(("text", tail.lstrip(" \t\r\n") if trim_next else tail))
    return [piece for piece in pieces if piece != ("text", "")]


def _check_action(words: str, original: str) -> str:
    if words.startswith("/*") and words.endswith("*/"):
        return "comment"
    parts = words.split()
    is_field = len(parts) == 1 and parts[0] in _FIELDS
    is_condition = len(parts) == 2 and parts[0] == "if" and parts[1] in _FIELDS
    if is_field or is_condition or words in ("else", "end"):
        return words if is_field or words in ("else", "end") else f"if {parts[1]}"
    raise ValueError(f"TEMPLATE: {original!r} cannot be translated from Ollama's Go template syntax (only "
                     "{{ .System }}, {{ .Prompt }}, {{ .Response }} and if/else/end on them can); write the "
                     "TEMPLATE as a Jinja chat template instead")


def _cut_at_response(pieces: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Everything before the first `{{ .Response }}`, with the `if`s still open there closed."""
    head, depth = [], 0
    for kind, value in pieces:
        if (kind, value) == ("action", ".Response"):
            break
        head.append((kind, value))
        if kind == "action":
            depth += value.startswith("if ") - (value == "end")
    return head + [("action", "end")] * depth


def _jinja_body(pieces: list[tuple[str, str]]) -> str:
    """The pieces as Jinja built of expressions and tags only, so the environment's trim_blocks and
    lstrip_blocks (transformers turns both on) cannot touch the template's own text."""
    out, depth = [], 0
    for kind, value in pieces:
        if kind == "text":
            out.append("{{ " + json.dumps(value) + " }}")
        elif value in _FIELDS:
            out.append("{{ " + _FIELDS[value] + " }}")
        elif value.startswith("if "):
            depth += 1
            out.append("{% if " + _FIELDS[value[3:]] + " %}")
        elif value == "else":
            if not depth:
                raise ValueError("TEMPLATE: {{ else }} outside an {{ if }}")
            out.append("{% else %}")
        elif value == "end":
            if not depth:
                raise ValueError("TEMPLATE: {{ end }} without an {{ if }}")
            depth -= 1
            out.append("{% endif %}")
    if depth:
        raise ValueError("TEMPLATE: an {{ if }} is never closed with {{ end }}")
    return "".join(out)
