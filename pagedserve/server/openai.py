"""The OpenAI-compatible routes: /v1/models, /v1/chat/completions, /v1/completions, and vLLM's
/tokenize and /detokenize. All of them sit behind the API key check.

Bodies are read and validated here rather than by FastAPI, so that the key is checked before the
body is read, a body over the size limit is refused while it arrives, and every malformed body is
a 400 in OpenAI's error shape (FastAPI would answer 422 in its own).
"""
from __future__ import annotations

import hmac
import json
import time
from http import HTTPStatus
from typing import Any, TypeVar

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ValidationError
from starlette.responses import JSONResponse, Response

from pagedserve.server.chat import create_chat_completion
from pagedserve.server.completions import create_completion
from pagedserve.server.errors import APIError, validation_message
from pagedserve.server.protocol import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from pagedserve.server.served_model import ServedModel
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


router = APIRouter(dependencies=[Depends(verify_api_key)])


@router.get("/v1/models")
async def list_models(request: Request) -> JSONResponse:
    state = server_state(request)
    created = int(time.time())
    for model in state.served_models:
        if model.max_model_len is None:
            await model.describe()   # not loaded yet: its context length from the checkpoint's header
    cards = [{"id": name, "object": "model", "created": created, "owned_by": "pagedserve",
              "root": model.requested, "parent": None, "max_model_len": model.max_model_len,
              "permission": [{"id": f"modelperm-{name}", "object": "model_permission", "created": created,
                              "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                              "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                              "organization": "*", "group": None, "is_blocking": False}]}
             for model in state.served_models for name in model.names]
    return JSONResponse({"object": "list", "data": cards})


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    state = server_state(request)
    body = await read_body(request, ChatCompletionRequest)
    model = find_model(state, body.model)
    return await state.respond(model, lambda _waited: create_chat_completion(body, request, state, model))


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    state = server_state(request)
    body = await read_body(request, CompletionRequest)
    model = find_model(state, body.model)
    return await state.respond(model, lambda _waited: create_completion(body, request, state, model))


@router.post("/tokenize")
async def tokenize(request: Request) -> JSONResponse:
    state = server_state(request)
    body = await read_body(request, TokenizeRequest)
    model = find_model(state, body.model)
    return await state.respond(model, lambda _waited: _tokenize(body, model))


async def _tokenize(body: TokenizeRequest, model: ServedModel) -> JSONResponse:
    tokenizer = model.engine.tokenizer
    if body.messages is not None:
        # the template already has BOS, so special tokens are only added when asked for
        _, token_ids = model.chat_prompt(
            body.messages, add_special_tokens=bool(body.add_special_tokens),
            add_generation_prompt=body.add_generation_prompt, continue_final_message=body.continue_final_message,
            chat_template=body.chat_template, tools=body.tools, chat_template_kwargs=body.chat_template_kwargs)
    elif body.prompt is not None:
        token_ids = tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens is not False)
    else:
        raise APIError("give either 'prompt' or 'messages'", param="prompt")
    token_strs = tokenizer.convert_ids_to_tokens(token_ids) if body.return_token_strs else None
    return JSONResponse({"count": len(token_ids), "max_model_len": model.max_model_len, "tokens": token_ids,
                         "token_strs": token_strs})


@router.post("/detokenize")
async def detokenize(request: Request) -> JSONResponse:
    state = server_state(request)
    body = await read_body(request, DetokenizeRequest)
    model = find_model(state, body.model)

    async def run(_waited: float) -> JSONResponse:
        model.check_token_ids(body.tokens, "tokens")
        return JSONResponse({"prompt": model.engine.tokenizer.decode(body.tokens)})

    return await state.respond(model, run)


def find_model(state: ServerState, name: str | None) -> ServedModel:
    """The model a request names (no name: the first one); 404 unless it is served."""
    model = state.lookup(name)
    if model is None:
        raise APIError(f"The model `{name}` does not exist.", HTTPStatus.NOT_FOUND, "model", "NotFoundError")
    return model


async def read_body(request: Request, model: type[Body]) -> Body:
    """The JSON body as `model`: 413 over the size limit, 400 when it is not valid JSON or not valid."""
    data = _parse_json(await _read_limited(request, server_state(request).server_config.max_request_body_bytes))
    try:
        return model.model_validate(data)
    except ValidationError as error:
        message, param = validation_message(error.errors(include_url=False))
        raise APIError(message, HTTPStatus.BAD_REQUEST, param) from None


async def _read_limited(request: Request, limit: int) -> bytes:
    too_large = APIError(f"the request body is larger than the limit of {limit} bytes (--max-request-body-bytes)",
                         HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _parse_json(raw: bytes) -> Any:
    if not raw.strip():
        raise APIError("missing request body", HTTPStatus.BAD_REQUEST)
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as error:
        raise APIError(f"the request body is not valid JSON: {error}", HTTPStatus.BAD_REQUEST) from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")
