"""POST /v1/embeddings (OpenAI's API with vLLM's extra fields), and the embedding run the Ollama routes share.

Each input (a string, or a list of token ids) becomes one engine request, pooled as the model's
sentence-transformers config says; all of them are queued at once, so the scheduler batches them.
"""
from __future__ import annotations

import base64
import struct
import time
from typing import Any, Literal

from pydantic import Field
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pagedserve.outputs import RequestOutput
from pagedserve.pooling_params import PoolingParams
from pagedserve.server.errors import APIError
from pagedserve.server.openai.protocol import OpenAIModel, random_id
from pagedserve.server.served_model import ServedModel
from pagedserve.server.state import ServerState
from pagedserve.server.streaming import collect_tracked

EmbeddingInput = str | list[str] | list[int] | list[list[int]]


class EmbeddingRequest(OpenAIModel):
    model: str | None = None
    input: EmbeddingInput
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = None
    # vLLM's extras
    truncate_prompt_tokens: int | None = Field(default=None, ge=-1)
    add_special_tokens: bool = True
    normalize: bool | None = None

    def inputs(self) -> list[str | list[int]]:
        """One entry per embedding: a text or a list of token ids."""
        value = self.input
        if isinstance(value, str):
            items: list[str | list[int]] = [value]
        elif value and all(isinstance(item, int) for item in value):
            items = [[int(item) for item in value]]   # one prompt given as token ids
        else:
            items = list(value)   # type: ignore[arg-type]  # list[str] or list[list[int]]
        if not items:
            raise APIError("'input' must not be empty", param="input")
        for item in items:
            if not item:
                raise APIError("'input' must not contain empty strings or token lists", param="input")
        return items


async def embed_inputs(state: ServerState, request: Request, model: ServedModel, request_id: str,
                       inputs: list[str | list[int]], params: PoolingParams, truncate: int | None = None,
                       keep_end: bool = False, lora_name: str | None = None) -> list[RequestOutput] | None:
    """Queue every input (pooled through the LoRA adapter `lora_name`, if given), then wait for all; None
    when the client left first. Raises ValueError / APIError (nothing left queued) for an input the model
    cannot take."""
    client = model.engine
    streams = []
    try:
        for index, prompt in enumerate(inputs):
            streams.append(await client.embed(prompt, params, f"{request_id}-{index}", truncate, keep_end,
                                              lora_name))
    except BaseException:
        for stream in streams:
            stream.abort()
        raise
    tracker = state.track(model, streams)
    finals = await collect_tracked(streams, request, tracker)
    if finals is not None:
        state.log_finished(request_id, list(finals))
    return finals


async def create_embedding(body: EmbeddingRequest, request: Request, state: ServerState,
                           model: ServedModel) -> Response:
    inputs = body.inputs()
    if not model.engine.is_embedding_model:
        # NOTE: also for a LoRA adapter's name: an adapter changes a model's weights, not what it is served for
        raise APIError("The model does not support Embeddings API", param="model")
    request_id = random_id("embd")
    # NOTE: vLLM's truncate_prompt_tokens keeps the last tokens of the input
    finals = await embed_inputs(state, request, model, request_id, inputs,
                                PoolingParams(dimensions=body.dimensions, normalize=body.normalize),
                                body.truncate_prompt_tokens, keep_end=True, lora_name=state.lora_name(body.model))
    if finals is None:
        return Response(status_code=499)   # the client is gone; nobody reads this
    data = [{"index": index, "object": "embedding", "embedding": _encode(output.embedding or [], body.encoding_format)}
            for index, output in enumerate(finals)]
    num_prompt_tokens = sum(len(output.prompt_token_ids) for output in finals)
    return JSONResponse({"id": request_id, "object": "list", "created": int(time.time()),
                         "model": body.model or model.name, "data": data,
                         "usage": {"prompt_tokens": num_prompt_tokens, "total_tokens": num_prompt_tokens,
                                   "completion_tokens": 0, "prompt_tokens_details": None}})


def _encode(embedding: list[float], encoding_format: str) -> Any:
    if encoding_format == "float":
        return embedding
    # OpenAI's base64: the little-endian float32 bytes (the openai SDK asks for this and decodes it)
    return base64.b64encode(struct.pack(f"<{len(embedding)}f", *embedding)).decode("ascii")
