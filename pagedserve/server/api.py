"""What every API route shares: the server state of a request, the API key check, and reading the body.

Bodies are read and validated here rather than by FastAPI, so that the key is checked before the
body is read, a body over the size limit is refused while it arrives, and every malformed body is
a 400 in OpenAI's error shape (FastAPI would answer 422 in its own).
"""
from __future__ import annotations

import asyncio
import hmac
import json
import re
from http import HTTPStatus
from typing import Any, TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from pagedserve.server.errors import APIError, validation_message
from pagedserve.server.state import ServerState

Body = TypeVar("Body", bound=BaseModel)


def server_state(request: Request) -> ServerState:
    return request.app.state.server


async def verify_api_key(request: Request) -> None:
    """401 unless the request carries one of the server's keys (`Authorization: Bearer KEY`, or `x-api-key`)."""
    keys = server_state(request).server_config.api_key
    if not keys:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer":
        token = request.headers.get("x-api-key", "")
    given = token.strip().encode()
    # NOTE: compare against every key, so the time taken does not tell which key came close.
    matches = [hmac.compare_digest(given, key.encode()) for key in keys]
    if not any(matches):
        raise APIError("Invalid or missing API key; send it as 'Authorization: Bearer <key>'.",
                       HTTPStatus.UNAUTHORIZED)


async def read_body(request: Request, model: type[Body]) -> Body:
    """The JSON body as `model`: 413 over the size limit, 408 when it stops arriving, 400 when it is not
    valid JSON or not valid."""
    config = server_state(request).server_config
    data = _parse_json(await _read_limited(request, config.max_request_body_bytes, config.timeout_request_body))
    try:
        return model.model_validate(data)
    except ValidationError as error:
        message, param = validation_message(error.errors(include_url=False))
        raise APIError(message, HTTPStatus.BAD_REQUEST, param) from None


async def _read_limited(request: Request, limit: int, idle_timeout: float) -> bytes:
    too_large = APIError(f"the request body is larger than the limit of {limit} bytes (--max-request-body-bytes)",
                         HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    stream = request.stream()
    while True:
        try:
            chunk = await asyncio.wait_for(stream.__anext__(), idle_timeout)
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            raise APIError(f"no part of the request body arrived for {idle_timeout:g} s (--timeout-request-body)",
                           HTTPStatus.REQUEST_TIMEOUT) from None
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


# A \uD800-\uDFFF escape: JSON allows it, but alone (not as half of a pair) it is no Unicode character,
# and the tokenizer (Rust, UTF-8 only) cannot take it.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89abcdefABCDEF][0-9a-fA-F]{2}")


# The deepest nesting of arrays and objects a body may have: Rust's serde_json default. Real requests
# (messages, tool schemas, chat_template_kwargs) stay far below; deeper ones would only reach the
# recursive code after parsing (validation, templates) and fail there.
MAX_JSON_DEPTH = 128
_CONTAINERS = {dict, list}


def _parse_json(raw: bytes) -> Any:
    if not raw.strip():
        raise APIError("missing request body", HTTPStatus.BAD_REQUEST)
    try:
        data = json.loads(raw, parse_constant=_reject_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as error:
        raise APIError(f"the request body is not valid JSON: {error}", HTTPStatus.BAD_REQUEST) from None
    except RecursionError:   # nested deeper than the parser's recursion allows: far past the limit
        raise _too_deep() from None
    _check_depth(data)
    if _SURROGATE_ESCAPE.search(raw):
        _check_unicode(data)
    return data


def _check_depth(data: Any) -> None:
    """400 if arrays and objects nest deeper than MAX_JSON_DEPTH (walked without recursion)."""
    pending: list[tuple[Any, int]] = [(data, 1)] if isinstance(data, (dict, list)) else []
    while pending:
        value, depth = pending.pop()
        children = list(value.values()) if isinstance(value, dict) else value
        if not _CONTAINERS & set(map(type, children)):   # NOTE: C-speed for a long list of token ids
            continue
        for child in children:
            if isinstance(child, (dict, list)):
                if depth >= MAX_JSON_DEPTH:
                    raise _too_deep()
                pending.append((child, depth + 1))


def _too_deep() -> APIError:
    return APIError(f"the request body nests arrays and objects more than {MAX_JSON_DEPTH} levels deep",
                    HTTPStatus.BAD_REQUEST)


def _check_unicode(data: Any) -> None:
    """400 if a string holds a lone surrogate (pairs decode to one character and pass)."""
    try:
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError as error:
        code = ord(error.object[error.start])
        raise APIError(f"the request body is not valid JSON text: it holds a lone UTF-16 surrogate "
                       f"(\\u{code:04x}) that is not half of a pair, so it is no Unicode character",
                       HTTPStatus.BAD_REQUEST) from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")
