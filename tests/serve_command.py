"""A `pagedserve serve` command line from a deployment file, parsed by the real CLI, and the route probes ask."""
from __future__ import annotations

from typing import Any

from pagedserve.cli.main import build_parser
from pagedserve.cli.options import engine_config_from_options, gather_options, server_config_from_options

# The server's health route (pagedserve/server/app.py): 503 while loading or draining, 200 when ready.
HEALTH_PATH = "/health"


def parse_serve(arguments: list[str]) -> dict[str, Any]:
    """`pagedserve serve ARGUMENTS` as the CLI takes them: options, engine and server configs (ValueError if bad)."""
    args = build_parser().parse_args(["serve", *arguments])
    options = gather_options(args, environ={})
    return {"options": options, "engine": engine_config_from_options(options),
            "server": server_config_from_options(options)}
