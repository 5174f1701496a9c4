"""deploy/Dockerfile read as instructions, and .dockerignore's rules, for the deployment tests."""
from __future__ import annotations

import json
import re
import shlex
from functools import cache
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO / "deploy" / "Dockerfile"


@cache
def instructions() -> tuple[tuple[str, str], ...]:
    """(INSTRUCTION, rest) in order, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return tuple((line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines)


def stages() -> dict[str, list[tuple[str, str]]]:
    """Each stage's instructions, by its name (FROM ... AS name)."""
    result: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for word, rest in instructions():
        if word == "FROM":
            current = result.setdefault(rest.split()[-1] if " AS " in rest.upper() else rest, [])
        current.append((word, rest))
    return result


def final_stage() -> list[tuple[str, str]]:
    return list(stages().values())[-1]


def values(stage: list[tuple[str, str]], instruction: str) -> list[str]:
    return [rest for word, rest in stage if word == instruction]


def env(stage: list[tuple[str, str]]) -> dict[str, str]:
    """The stage's ENV settings (KEY=VALUE form)."""
    settings: dict[str, str] = {}
    for rest in values(stage, "ENV"):
        settings.update(word.split("=", 1) for word in shlex.split(rest))
    return settings


def entrypoint() -> list[str]:
    (value,) = values(final_stage(), "ENTRYPOINT")
    return json.loads(value)


def is_ignored(path: str, dockerignore: Path = REPO / ".dockerignore") -> bool:
    """Whether `docker build` leaves `path` (relative to the context) out: the last matching rule wins,
    and a rule that matches a folder matches everything in it."""
    ignored = False
    for rule in dockerignore.read_text().splitlines():
        rule = rule.strip()
        if not rule or rule.startswith("#"):
            continue
        negated, pattern = rule.startswith("!"), rule.lstrip("!").strip("/")
        regex = re.compile(re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*")
                           .replace(r"\*", "[^/]*").replace(r"\?", "[^/]"))
        parts = path.strip("/").split("/")
        if any(regex.fullmatch("/".join(parts[:end])) for end in range(1, len(parts) + 1)):
            ignored = not negated
    return ignored
