"""Ollama's Modelfile: parsing `FROM`, `PARAMETER`, `TEMPLATE`, `SYSTEM`, `MESSAGE` and `LICENSE`, and
writing one back for `pagedserve show --modelfile`.

Syntax as Ollama's parser takes it: one command per line (case-insensitive), `#` comments, values
bare to the end of the line, in "quotes" or in \"\"\"triple quotes\"\"\" (both may span lines). No torch here.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

# PARAMETER name -> value type; "stop" may repeat. The others Ollama knows are accepted and ignored.
PARAMETER_TYPES: dict[str, type] = {
    "num_ctx": int, "num_predict": int, "seed": int, "top_k": int, "temperature": float, "top_p": float,
    "min_p": float, "repeat_penalty": float, "presence_penalty": float, "frequency_penalty": float, "stop": str,
}
IGNORED_PARAMETERS = frozenset({
    "num_keep", "repeat_last_n", "typical_p", "tfs_z", "mirostat", "mirostat_eta", "mirostat_tau", "num_batch",
    "num_gpu", "main_gpu", "num_thread", "use_mmap", "use_mlock", "numa", "penalize_newline", "low_vram",
    "f16_kv", "logits_all", "vocab_only", "embedding_only", "num_gqa",
})
_COMMANDS = ("from", "parameter", "template", "system", "message", "license", "adapter", "draft", "requires",
             "renderer", "parser")
_MESSAGE_ROLES = ("system", "user", "assistant")
_WORD = re.compile(r"[A-Za-z0-9_]+")


@dataclass(frozen=True)
class Modelfile:
    from_: str
    parameters: dict[str, Any] = field(default_factory=dict)   # stop: list[str]; others one value
    template: str | None = None
    system: str | None = None
    messages: tuple[tuple[str, str], ...] = ()                  # (role, content)
    license: str | None = None

    def to_text(self, from_: str | None = None) -> str:
        """The Modelfile again, `FROM` replaced by `from_` when given."""
        lines = [f"FROM {from_ or self.from_}"]
        if self.template is not None:
            lines.append(f"TEMPLATE {_quote(self.template)}")
        if self.system is not None:
            lines.append(f"SYSTEM {_quote(self.system)}")
        for name, value in self.parameters.items():
            for item in value if isinstance(value, list) else [value]:
                lines.append(f"PARAMETER {name} {_quote(item) if isinstance(item, str) else item}")
        lines.extend(f"MESSAGE {role} {_quote(content)}" for role, content in self.messages)
        if self.license is not None:
            lines.append(f"LICENSE {_quote(self.license)}")
        return "\n".join(lines) + "\n"


def parse_modelfile(text: str) -> Modelfile:
    """Raises ValueError with the line number for anything Ollama would refuse or we cannot honour."""
    commands = list(_commands(text.lstrip("\ufeff")))
    values: dict[str, Any] = {"parameters": {}, "messages": []}
    for line, name, argument, value in commands:
        if name == "from":
            values["from_"] = value
        elif name == "parameter":
            _add_parameter(values["parameters"], argument, value, line)
        elif name == "message":
            values["messages"].append((argument, value))
        elif name in ("template", "system", "license"):
            values[name] = value
        elif name in ("adapter", "draft"):
            raise ValueError(f"Modelfile line {line}: {name.upper()} is not supported")
        else:
            logger.warning("Modelfile line %d: %s is ignored", line, name.upper())
    if "from_" not in values:
        raise ValueError("no FROM line in the Modelfile")
    return Modelfile(from_=values.pop("from_"), parameters=values.pop("parameters"),
                     messages=tuple(values.pop("messages")), **values)


def convert_parameter(name: str, value: Any) -> Any:
    """A PARAMETER (or Ollama option) value of the type its name needs; ValueError otherwise."""
    kind = PARAMETER_TYPES[name]
    if kind is str:
        return str(value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"PARAMETER {name}: {value!r} is not a number") from None
    if kind is int:
        if number != int(number):
            raise ValueError(f"PARAMETER {name}: {value!r} is not a whole number")
        return int(number)
    return number


def _add_parameter(parameters: dict[str, Any], name: str, value: str, line: int) -> None:
    name = name.lower()
    if name in IGNORED_PARAMETERS:
        logger.warning("Modelfile line %d: PARAMETER %s has no effect here; ignored", line, name)
        return
    if name not in PARAMETER_TYPES:
        raise ValueError(f"Modelfile line {line}: unknown parameter '{name}'")
    try:
        converted = convert_parameter(name, value)
    except ValueError as error:
        raise ValueError(f"Modelfile line {line}: {error}") from None
    if name == "stop":
        parameters.setdefault("stop", []).append(converted)
    else:
        parameters[name] = converted


def _commands(text: str):
    """(line number, command, argument, value) for each command; argument is the PARAMETER name or MESSAGE role."""
    position, line = 0, 1
    while True:
        while position < len(text) and text[position] in " \t\r\n":
            line += text[position] == "\n"
            position += 1
        if position >= len(text):
            return
        if text[position] == "#":
            position = _end_of_line(text, position)
            continue
        start_line = line
        name, position = _word(text, position, start_line)
        name = name.lower()
        if name not in _COMMANDS:
            raise ValueError(f"Modelfile line {start_line}: unknown command {name.upper()!r}")
        argument = ""
        if name in ("parameter", "message"):
            argument, position = _word(text, _skip_spaces(text, position), start_line)
            if name == "message" and argument not in _MESSAGE_ROLES:
                raise ValueError(f"Modelfile line {start_line}: MESSAGE role must be one of "
                                 f"{', '.join(_MESSAGE_ROLES)}, got {argument!r}")
        value, position = _value(text, _skip_spaces(text, position), start_line)
        line += value.count("\n")
        yield start_line, name, argument, value


def _word(text: str, position: int, line: int) -> tuple[str, int]:
    match = _WORD.match(text, position)
    if match is None or match.end() >= len(text) or text[match.end()] not in " \t":
        raise ValueError(f"Modelfile line {line}: expected a command followed by its value")
    return match[0], match.end()


def _skip_spaces(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t":
        position += 1
    return position


def _end_of_line(text: str, position: int) -> int:
    end = text.find("\n", position)
    return len(text) if end < 0 else end


def _value(text: str, position: int, line: int) -> tuple[str, int]:
    for quote in ('"""', '"'):
        if text.startswith(quote, position):
            end = text.find(quote, position + len(quote))
            if end < 0:
                raise ValueError(f"Modelfile line {line}: unterminated {quote} string")
            after = _end_of_line(text, end + len(quote))
            if text[end + len(quote):after].strip():
                raise ValueError(f"Modelfile line {line}: unexpected text after the closing {quote}")
            return text[position + len(quote):end], after
    end = _end_of_line(text, position)
    value = text[position:end].strip()
    if not value:
        raise ValueError(f"Modelfile line {line}: missing value")
    return value, end


def _quote(value: str) -> str:
    if "\n" in value or '"' in value or value != value.strip() or not value:
        return f'"""{value}"""'
    return f'"{value}"' if " " in value else value
