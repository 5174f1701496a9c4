"""Talking to a running server from the command line (`list --url`, `ps`, `run --url`, `pull --url`, `cp --url`,
`stop`): the --url/--api-key flags and the requests, with the server's error shown as one line."""
from __future__ import annotations

import argparse
import os
from typing import Any

DEFAULT_URL = "http://127.0.0.1:8000"


def add_server_flags(parser: argparse.ArgumentParser, default_url: str | None,
                     without_url: str = "instead of loading the model here") -> None:
    where = f"(default: {default_url})" if default_url else without_url
    parser.add_argument("--url", default=default_url, help=f"a running server, e.g. {DEFAULT_URL} {where}")
    parser.add_argument("--api-key", "--api_key", dest="server_api_key", metavar="KEY",
                        default=os.environ.get("PAGEDSERVE_API_KEY"),
                        help="the server's API key (default: $PAGEDSERVE_API_KEY)")


def headers(args: argparse.Namespace) -> dict[str, str]:
    return {"Authorization": f"Bearer {args.server_api_key}"} if args.server_api_key else {}


def get(args: argparse.Namespace, path: str) -> Any:
    return _request(args, "GET", path, None, timeout=30)


def post(args: argparse.Namespace, path: str, body: dict[str, Any]) -> Any:
    return _request(args, "POST", path, body, timeout=60)


def _request(args: argparse.Namespace, method: str, path: str, body: dict[str, Any] | None, timeout: float) -> Any:
    import httpx

    url = args.url.rstrip("/")
    try:
        response = httpx.request(method, url + path, json=body, headers=headers(args), timeout=timeout)
    except httpx.HTTPError as error:
        raise ValueError(f"cannot reach the server at {url}: {error}") from None
    if response.status_code != 200:
        try:
            error = response.json().get("error", response.text)
            message = error.get("message", str(error)) if isinstance(error, dict) else str(error)
        except ValueError:
            message = response.text.strip()
        raise ValueError(f"{url}{path} answered {response.status_code}: {message}")
    return response.json() if response.content else None
