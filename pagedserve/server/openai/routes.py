"""The OpenAI-compatible routes: /v1/models (and /v1/models/{id}), /v1/chat/completions, /v1/completions,
/v1/embeddings, /v1/responses, and vLLM's /tokenize and /detokenize. All of them sit behind the API key check."""
from __future__ import annotations

import time
from http import HTTPStatus

from fastapi import APIRouter, Depends, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response

from pagedserve.engine.lora import LoRAError
from pagedserve.engine.processor import ChatOptions
from pagedserve.server.api import read_body, server_state, verify_api_key
from pagedserve.server.errors import APIError
from pagedserve.server.openai.chat import create_chat_completion
from pagedserve.server.openai.completions import create_completion
from pagedserve.server.openai.embeddings import EmbeddingRequest, create_embedding
from pagedserve.server.openai.responses import ResponsesRequest, create_response
from pagedserve.server.openai.protocol import (ChatCompletionRequest, CompletionRequest, DetokenizeRequest,
                                               LoadLoRAAdapterRequest, TokenizeRequest, UnloadLoRAAdapterRequest,
                                               check_roles)
from pagedserve.server.served_model import ServedModel
from pagedserve.server.state import ServerState

router = APIRouter(dependencies=[Depends(verify_api_key)])


@router.get("/v1/models")
async def list_models(request: Request) -> JSONResponse:
    state = server_state(request)
    created = int(time.time())
    for model in state.served_models:
        if model.max_model_len is None:
            await model.describe()   # not loaded yet: its context length from the checkpoint's header
    cards = [_model_card(name, model, created) for model in state.served_models for name in model.names]
    # LoRA adapters as vLLM lists them: root = the adapter's folder, parent = the base model.
    cards += [_lora_card(name, model, path, base, created) for name, (model, path, base) in state.loras.items()]
    return JSONResponse({"object": "list", "data": cards})


@router.get("/v1/models/{model_id:path}")
async def retrieve_model(model_id: str, request: Request) -> JSONResponse:
    """One model's card (the openai SDK's models.retrieve); an unknown id is OpenAI's 404."""
    state = server_state(request)
    model = state.lookup(model_id)
    if model is None:
        return JSONResponse({"error": {"message": f"The model '{model_id}' does not exist", "type": "invalid_request_error",
                                       "param": "model", "code": "model_not_found"}}, status_code=HTTPStatus.NOT_FOUND)
    if model.max_model_len is None:
        await model.describe()
    lora = state.loras.get(model_id)
    if lora is not None:
        return JSONResponse(_lora_card(model_id, *lora, int(time.time())))
    return JSONResponse(_model_card(model_id, model, int(time.time())))


def _model_card(name: str, model: ServedModel, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "pagedserve",
            "root": model.requested, "parent": None, "max_model_len": model.max_model_len,
            "permission": [{"id": f"modelperm-{name}", "object": "model_permission", "created": created,
                            "allow_create_engine": False, "allow_sampling": True, "allow_logprobs": True,
                            "allow_search_indices": False, "allow_view": True, "allow_fine_tuning": False,
                            "organization": "*", "group": None, "is_blocking": False}]}


def _lora_card(name: str, model: ServedModel, path: str, base: str | None, created: int) -> dict:
    return {**_model_card(name, model, created), "root": path, "parent": base or model.name}


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(request: Request) -> Response:
    state = server_state(request)
    _check_runtime_lora(state)
    body = await read_body(request, LoadLoRAAdapterRequest)
    if not body.lora_name or not body.lora_path:
        raise APIError("Both 'lora_name' and 'lora_path' must be provided.", param="lora_name")
    if body.lora_name in state.loras or state.lookup(body.lora_name) is not None:
        raise APIError(f"The lora adapter '{body.lora_name}' has already been loaded.", param="lora_name")
    model = state.served_models[0]

    async def run(_waited: float) -> Response:
        try:
            await model.engine.add_lora(body.lora_name, body.lora_path)
        except LoRAError as error:
            raise APIError(str(error), param="lora_path") from None
        state.loras[body.lora_name] = (model, body.lora_path, None)
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")

    return await state.respond(model, run)


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(request: Request) -> Response:
    state = server_state(request)
    _check_runtime_lora(state)
    body = await read_body(request, UnloadLoRAAdapterRequest)
    entry = state.loras.get(body.lora_name)
    if entry is None:
        raise APIError(f"The lora adapter '{body.lora_name}' cannot be found.", HTTPStatus.NOT_FOUND, "lora_name",
                       "NotFoundError")
    model = entry[0]

    async def run(_waited: float) -> Response:
        try:
            await model.engine.remove_lora(body.lora_name)
        except LoRAError as error:
            raise APIError(str(error), param="lora_name") from None
        del state.loras[body.lora_name]
        return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")

    return await state.respond(model, run)


def _check_runtime_lora(state: ServerState) -> None:
    """vLLM serves these routes only with VLLM_ALLOW_RUNTIME_LORA_UPDATING=True; otherwise they do not exist."""
    if not state.server_config.allow_runtime_lora_updating:
        raise APIError("runtime LoRA updating is off: set VLLM_ALLOW_RUNTIME_LORA_UPDATING=True "
                       "(or --allow-runtime-lora-updating)", HTTPStatus.NOT_FOUND, None, "NotFoundError")
    if not state.engine_config.enable_lora:
        raise APIError("LoRA adapters need --enable-lora")


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


@router.post("/v1/embeddings")
async def embeddings(request: Request) -> Response:
    state = server_state(request)
    body = await read_body(request, EmbeddingRequest)
    model = find_model(state, body.model)
    return await state.respond(model, lambda _waited: create_embedding(body, request, state, model))


@router.post("/v1/responses")
async def responses(request: Request) -> Response:
    state = server_state(request)
    body = await read_body(request, ResponsesRequest)
    model = find_model(state, body.model)
    return await state.respond(model, lambda _waited: create_response(body, request, state, model))


@router.post("/tokenize")
async def tokenize(request: Request) -> JSONResponse:
    state = server_state(request)
    body = await read_body(request, TokenizeRequest)
    model = find_model(state, body.model)
    return await state.respond(model, lambda _waited: _tokenize(body, state, model))


async def _tokenize(body: TokenizeRequest, state: ServerState, model: ServedModel) -> JSONResponse:
    client = model.engine
    if body.messages is not None:
        check_roles(body.messages)
        state.check_request_template(body.chat_template, body.chat_template_kwargs)
        # the template already has BOS, so special tokens are only added when asked for
        prompt = await client.render_chat(body.messages, ChatOptions(
            add_generation_prompt=body.add_generation_prompt, continue_final_message=body.continue_final_message,
            chat_template=body.chat_template, tools=body.tools, chat_template_kwargs=body.chat_template_kwargs,
            add_special_tokens=bool(body.add_special_tokens)))
        token_ids = prompt.token_ids
    elif body.prompt is not None:
        token_ids = await client.tokenize(body.prompt, add_special_tokens=body.add_special_tokens is not False)
    else:
        raise APIError("give either 'prompt' or 'messages'", param="prompt")
    token_strs = await client.token_strings(token_ids) if body.return_token_strs else None
    return JSONResponse({"count": len(token_ids), "max_model_len": model.max_model_len, "tokens": token_ids,
                         "token_strs": token_strs})


@router.post("/detokenize")
async def detokenize(request: Request) -> JSONResponse:
    state = server_state(request)
    body = await read_body(request, DetokenizeRequest)
    model = find_model(state, body.model)

    async def run(_waited: float) -> JSONResponse:
        return JSONResponse({"prompt": await model.engine.decode(body.tokens)})

    return await state.respond(model, run)


def find_model(state: ServerState, name: str | None) -> ServedModel:
    """The model a request names (no name: the first one); 404 unless it is served."""
    model = state.lookup(name)
    if model is None:
        raise APIError(f"The model `{name}` does not exist.", HTTPStatus.NOT_FOUND, "model", "NotFoundError")
    return model
