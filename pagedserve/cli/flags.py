"""Command-line flags derived from config dataclasses, in every spelling people paste from guides.

Each dataclass field `max_model_len` becomes `--max-model-len` and `--max_model_len`; `--flag=value`
works as argparse does; integers accept sizes like `32k` (1000s) and `32K` (1024s), as vLLM's do;
booleans get `--flag/--no-flag`. `--config FILE` (YAML or JSON) supplies the same options, and flags on
the command line win over the file.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import types
import typing
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtKMGT]?)\s*$")
_DECIMAL = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def parse_size(text: str) -> int:
    """'2048' -> 2048, '32k' -> 32000, '32K' -> 32768, '1.5m' -> 1500000."""
    match = _SIZE.match(str(text))
    if not match:
        raise argparse.ArgumentTypeError(f"expected an integer like 2048, 32k or 32K, got {text!r}")
    number, suffix = match.groups()
    multiplier = _BINARY[suffix] if suffix in _BINARY else _DECIMAL[suffix]
    value = float(number) * multiplier
    if value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")
    return int(value)


def parse_bool(text: str | bool) -> bool:
    if isinstance(text, bool):
        return text
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def flag_names(name: str) -> list[str]:
    dashed = "--" + name.replace("_", "-")
    underscored = "--" + name
    return [dashed] if dashed == underscored else [dashed, underscored]


def add_dataclass_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type,
                        skip: tuple[str, ...] = (), environment: dict[str, tuple[str, ...]] | None = None) -> None:
    """One flag per field of `cls`. Defaults are suppressed so only what the user typed is seen.
    `environment`: field name -> the variables backing it, named in the flag's help."""
    hints = typing.get_type_hints(cls)
    for item in dataclasses.fields(cls):
        if item.name in skip or not item.init:
            continue
        kind, is_list = _base_type(hints[item.name])
        help_text = item.metadata.get("help", "")
        variables = (environment or {}).get(item.name)
        if variables:
            help_text += f" [env: {', '.join(variables)}]"
        kwargs: dict[str, Any] = {"dest": item.name, "default": argparse.SUPPRESS, "help": help_text}
        names = [*flag_names(item.name), *item.metadata.get("aliases", ())]
        if kind is bool:
            parser.add_argument(*names, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if "choices" in item.metadata:
            kwargs["choices"] = item.metadata["choices"]
        if item.metadata.get("case_insensitive"):
            kwargs["type"] = str.lower
        if is_list:
            kwargs["nargs"] = "+"
            kwargs["action"] = "extend"
        kwargs.setdefault("type", parse_size_or_auto if item.metadata.get("auto") else _parser_for(kind))
        parser.add_argument(*names, **kwargs)


def parse_size_or_auto(text: str) -> int | None:
    """A size, or None for vLLM's "auto" and -1 (the model decides)."""
    return None if str(text).strip().lower() in ("auto", "-1") else parse_size(text)


def add_accepted_flags(parser: argparse.ArgumentParser, flags: dict[str, tuple[str, str]],
                       short_aliases: dict[str, str] | None = None, per_flag_reasons: bool = False) -> None:
    """Flags we accept for compatibility but that do nothing here; each logs why when used.
    `flags`: name -> (kind: switch, value, list or optional; reason). `--help` lists them in sections of
    their own: one per reason, or one with each flag's reason when `per_flag_reasons`. A name the parser
    already has is a real flag, and is left to it."""
    taken = parser._option_string_actions
    groups: dict[str, argparse._ArgumentGroup] = {}
    for name, (kind, reason) in flags.items():
        names = [option for option in (*flag_names(name), (short_aliases or {}).get(name.replace("_", "-")))
                 if option and option not in taken]
        if len(names) < len(flag_names(name)):
            continue
        section = "" if per_flag_reasons else reason
        if section not in groups:
            groups[section] = parser.add_argument_group(
                "accepted vLLM flags, no effect here", reason if section else None)
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS,
                                  "help": reason if per_flag_reasons else None}
        if kind == "switch":
            groups[section].add_argument(*names, action=argparse.BooleanOptionalAction, **kwargs)
        else:
            nargs = {"list": "+", "optional": "?", "value": None}[kind]
            groups[section].add_argument(*names, nargs=nargs, metavar="VALUE", **kwargs)


def load_config_file(path: str) -> dict[str, Any]:
    """Options from a YAML or JSON file, keys in either spelling (max-model-len or max_model_len)."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"config file {path} does not exist")
    text = file.read_text()
    try:
        if file.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as error:   # json and yaml raise their own error types
        raise ValueError(f"config file {path} is not valid {file.suffix.lstrip('.').upper() or 'YAML'}: {error}")
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of option names to values")
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def coerce_file_options(options: dict[str, Any], cls: type) -> dict[str, Any]:
    """Convert config-file values for `cls`'s fields (sizes and booleans may be strings there)."""
    hints = typing.get_type_hints(cls)
    converted = {}
    for name, value in options.items():
        if name not in hints or value is None:
            continue
        kind, is_list = _base_type(hints[name])
        convert = parse_bool if kind is bool else _parser_for(kind)
        if is_list:
            converted[name] = [convert(v) for v in (value if isinstance(value, list) else [value])]
        else:
            converted[name] = convert(value) if isinstance(value, str) or kind is bool else value
    return converted


def pick(options: dict[str, Any], cls: type) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return {k: v for k, v in options.items() if k in names}


def _parser_for(kind: type):
    if kind is int:
        return parse_size
    if kind is bool:
        return parse_bool
    return kind


def _base_type(hint: Any) -> tuple[type, bool]:
    """(element type, is a list) for hints like `int | None` or `list[str] | None`."""
    args = typing.get_args(hint)
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in args if a is not type(None))
    if typing.get_origin(hint) in (list, tuple):
        return typing.get_args(hint)[0], True
    return hint, False
