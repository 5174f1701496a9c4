"""Ollama's embedding routes: /api/embed (input: a string or a list; L2-normalized vectors, as Ollama
returns them) and the older /api/embeddings (prompt -> one unnormalized embedding, as Ollama's is).
Both run through the OpenAI route's embedding run (server/openai/embeddings.py)."""
from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from pydantic import Field
from starlette.responses import JSONResponse, Response

from pagedserve.pooling_params import PoolingParams
from pagedserve.server.api import read_body, server_state
from pagedserve.server.errors import APIError
from pagedserve.server.ollama.models import find_model
from pagedserve.server.ollama.protocol import OllamaBody, parse_duration
from pagedserve.server.openai.embeddings import embed_inputs
from pagedserve.server.openai.protocol import random_id
from pagedserve.server.served_model import ServedModel

router = APIRouter()


class _EmbedOptions(OllamaBody):
    options: dict[str, Any] | None = None
    keep_alive: str | float | None = None

    def keep_alive_seconds(self) -> float | None:
        return None if self.keep_alive is None else parse_duration(self.keep_alive)

    def context_limit(self, model: ServedModel) -> int | None:
        """options.num_ctx, at most the server's context length; None without one."""
        num_ctx = (self.options or {}).get("num_ctx")
        if num_ctx is None:
            return None
        if not isinstance(num_ctx, int) or num_ctx < 1:
            raise APIError(f'option "num_ctx" must be a positive integer, got {num_ctx!r}', param="num_ctx")
        return min(num_ctx, model.max_model_len) if model.max_model_len else num_ctx


class EmbedBody(_EmbedOptions):
    input: str | list[str] = ""
    truncate: bool = True
    dimensions: int | None = Field(default=None, ge=1)


class EmbeddingsBody(_EmbedOptions):
    prompt: str = ""


@router.post("/api/embed")
async def embed(request: Request) -> Response:
    start = time.perf_counter()
    state = server_state(request)
    body = await read_body(request, EmbedBody)
    model = find_model(state, body)
    inputs: list[str | list[int]] = [body.input] if isinstance(body.input, str) else list(body.input)
    inputs = [text for text in inputs if text]   # "" or []: just load the model, as Ollama does

    async def answer(waited: float) -> Response:
        _check_embedding_model(model)
        finals = []
        if inputs:
            # truncate (the default): cut each input at the context, keeping the tokenizer's end token
            limit = (body.context_limit(model) or -1) if body.truncate else None
            finals = await embed_inputs(state, request, model, random_id("embed"), inputs,
                                        PoolingParams(dimensions=body.dimensions, normalize=True), limit,
                                        lora_name=state.lora_name(body.model or body.name))
            if finals is None:
                return Response(status_code=499)
        return JSONResponse({"model": body.model or body.name, "embeddings": [output.embedding for output in finals],
                             "total_duration": _nanoseconds(time.perf_counter() - start),
                             "load_duration": _nanoseconds(waited),
                             "prompt_eval_count": sum(len(output.prompt_token_ids) for output in finals)})

    return await state.respond(model, answer, body.keep_alive_seconds())


@router.post("/api/embeddings")
async def embeddings(request: Request) -> Response:
    state = server_state(request)
    body = await read_body(request, EmbeddingsBody)
    model = find_model(state, body)

    async def answer(_waited: float) -> Response:
        _check_embedding_model(model)
        if not body.prompt:
            return JSONResponse({"embedding": []})
        finals = await embed_inputs(state, request, model, random_id("embeddings"), [body.prompt],
                                    PoolingParams(normalize=False), body.context_limit(model) or -1,
                                    lora_name=state.lora_name(body.model or body.name))
        if finals is None:
            return Response(status_code=499)
        return JSONResponse({"embedding": finals[0].embedding})

    return await state.respond(model, answer, body.keep_alive_seconds())


def _check_embedding_model(model: ServedModel) -> None:
    if not model.engine.is_embedding_model:
        raise APIError("this model does not support embeddings")


def _nanoseconds(seconds: float) -> int:
    return max(int(seconds * 1e9), 1)
