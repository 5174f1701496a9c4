"""Durations as Ollama spells them (`keep_alive`, `--keep-alive`): "5m", "1h30m", "300ms", 300, -1, "0".

Go's time.ParseDuration syntax for strings, a plain number means seconds, and any negative value
means forever (math.inf). No torch here.
"""
from __future__ import annotations

import math
import re

_UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_NUMBER = re.compile(r"^[-+]?(\d+(?:\.\d*)?|\.\d+)$")

FOREVER = math.inf


def parse_duration(value: str | int | float) -> float:
    """Seconds for a duration; math.inf for a negative one. Raises ValueError naming the bad value."""
    if isinstance(value, bool):
        raise ValueError(f"invalid duration {value!r}: expected e.g. '5m', '1h', 300 or -1")
    if isinstance(value, (int, float)):
        if math.isnan(value):
            raise ValueError("invalid duration NaN")
        return FOREVER if value < 0 else float(value)
    text = value.strip()
    if _NUMBER.match(text):
        return parse_duration(float(text))
    sign, body = (-1.0, text[1:]) if text.startswith("-") else (1.0, text.lstrip("+"))
    seconds, position = 0.0, 0
    for match in _PART.finditer(body):
        if match.start() != position:
            break
        seconds += float(match[1]) * _UNIT_SECONDS[match[2]]
        position = match.end()
    if not body or position != len(body):
        raise ValueError(f"invalid duration {value!r}: expected e.g. '5m', '1h30m', '300ms', 300 (seconds) "
                         "or -1 (forever)")
    return FOREVER if sign < 0 and seconds > 0 else seconds


def format_duration(seconds: float) -> str:
    """'forever', '5m', '1h30m', '45s' or '250ms': the short form people write."""
    if math.isinf(seconds):
        return "forever"
    if seconds < 1:
        return f"{seconds * 1000:g}ms"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    parts = [f"{int(hours)}h" if hours else "", f"{int(minutes)}m" if minutes else "", f"{secs:g}s" if secs else ""]
    return "".join(parts)
