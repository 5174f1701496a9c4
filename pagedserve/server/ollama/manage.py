"""The Ollama API's routes that change which models a server has: /api/pull, /api/create, /api/copy and
/api/delete (mounted by ollama/routes.py, behind the API key).

A pulled model is downloaded into the hub cache (loader/source.py, huggingface_hub's client) and served
under the name it was pulled as; progress streams as Ollama's NDJSON lines (status, digest, total,
completed). Created and copied models are saved in the models directory (store/models_dir.py) and served
at once; a created model can be deleted. All of them load on first use.
"""
from __future__ import annotations

import asyncio
import json
import logging
from http import HTTPStatus
from pathlib import Path
from typing import Any, AsyncIterator, Callable

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from pagedserve.server.api import read_body, server_state
from pagedserve.server.errors import APIError, from_exception
from pagedserve.server.ollama.protocol import CopyBody, CreateBody, OllamaBody, PullBody
from pagedserve.server.state import ServerState
from pagedserve.store.models_dir import copy_model, create_model, find_manifest, models_dir, remove_manifest
from pagedserve.store.modelfile import Modelfile

logger = logging.getLogger(__name__)
router = APIRouter()

Events = Callable[[dict[str, Any]], None]


@router.post("/api/pull")
async def pull(request: Request) -> Response:
    state = server_state(request)
    body = await read_body(request, PullBody)
    name = _name(body)

    def work(emit: Events) -> None:
        emit({"status": "pulling manifest"})
        if state.lookup(name) is None:
            _download(state, name, emit)
            emit({"status": "verifying sha256 digest"})
            emit({"status": "writing manifest"})

    return await _respond(state, work, body.stream, lambda: state.add_model(name))


@router.post("/api/create")
async def create(request: Request) -> Response:
    state = server_state(request)
    body = await read_body(request, CreateBody)
    name = _name(body)
    if body.files or body.adapters or body.quantize:
        raise APIError("files, adapters and quantize are not supported: create FROM a model this server can load "
                       "(a path on the server, an alias, a hub repo id or a created model)")
    text = body.modelfile if body.modelfile is not None else _modelfile_text(body)
    directory = models_dir(state.engine_config.models_dir)

    def work(emit: Events) -> None:
        emit({"status": "reading model metadata"})
        create_model(name, text, directory, Path.cwd())
        emit({"status": "writing manifest"})

    return await _respond(state, work, body.stream, lambda: _serve_anew(state, name))


@router.post("/api/copy")
async def copy(request: Request) -> Response:
    state = server_state(request)
    body = await read_body(request, CopyBody)
    served = state.lookup(body.source)
    source = body.source if served is None else served.manifest.name if served.manifest else served.requested
    try:
        await asyncio.to_thread(copy_model, source, body.destination, models_dir(state.engine_config.models_dir),
                                Path.cwd())
    except ValueError as error:
        raise APIError(str(error), HTTPStatus.NOT_FOUND if served is None else HTTPStatus.BAD_REQUEST) from error
    await _serve_anew(state, body.destination)
    return Response(status_code=HTTPStatus.OK)


@router.delete("/api/delete")
async def delete(request: Request) -> Response:
    state = server_state(request)
    body = await read_body(request, OllamaBody)
    name = _name(body)
    directory = models_dir(state.engine_config.models_dir)
    model = state.lookup(name)
    manifest = find_manifest(name, directory)
    if manifest is None:
        if model is None:
            raise APIError(f"model '{name}' not found", HTTPStatus.NOT_FOUND)
        raise APIError(f"model '{name}' was named when the server started; only created models can be deleted")
    remove_manifest(manifest.name, directory)
    if model is not None:
        await state.remove_model(model)
    return Response(status_code=HTTPStatus.OK)


# ---- helpers ----------------------------------------------------------------------------------------

def _name(body: OllamaBody) -> str:
    name = body.model or body.name
    if not name:
        raise APIError("model is required")
    return name


async def _serve_anew(state: ServerState, name: str) -> None:
    """Serve a (re)created model: an old one under this name is replaced, so its new Modelfile applies."""
    old = state.lookup(name)
    if old is not None:
        await state.remove_model(old)
    state.add_model(name)


def _download(state: ServerState, name: str, emit: Events) -> None:
    from pagedserve.loader.download import DownloadProgress
    from pagedserve.loader.source import resolve_model

    config = state.engine_config
    last: dict[str, int] = {}

    def progress(event: DownloadProgress) -> None:
        # NOTE: one line per percent (and the last), not one per network chunk.
        step = max((event.total or 0) // 100, 1)
        if event.completed // step == last.get(event.file) and event.completed != event.total:
            return
        last[event.file] = event.completed // step
        digest = event.digest or event.file
        emit({"status": f"pulling {digest.removeprefix('sha256:')[:12]}", "digest": digest,
              "total": event.total or 0, "completed": event.completed})

    try:
        resolve_model(name, config.revision, config.download_dir, config.use_modelscope, progress)
    except ValueError as error:
        if not str(error).startswith("unknown model"):
            raise
        raise APIError(f"model '{name}' not found: pagedserve pulls from the Hugging Face hub (org/name, "
                       "hf.co/org/name:Q4_K_M), ModelScope (modelscope:org/name) or a URL to a .gguf, not from "
                       "Ollama's registry", HTTPStatus.NOT_FOUND) from error


async def _respond(state: ServerState, work: Callable[[Events], None], stream: bool,
                   finish: Callable[[], Any]) -> Response:
    """Run `work` on a thread; stream its events as NDJSON (then success or an error line), or answer once."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    def emit(event: dict[str, Any]) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, event)

    async def run() -> None:
        try:
            await asyncio.to_thread(work, emit)
            result = finish()
            if asyncio.iscoroutine(result):
                await result
            emit({"status": "success"})
        except Exception as error:   # noqa: BLE001 - a failed pull or create is the client's answer
            logger.warning("%s", error)
            api_error = from_exception(error)
            emit({"error": api_error.message, "status_code": int(api_error.status)})
        emit_end()

    def emit_end() -> None:
        loop.call_soon_threadsafe(queue.put_nowait, None)

    task = loop.create_task(run())
    if not stream:
        events = [event async for event in _drain(queue)]
        await task
        if "error" in events[-1]:
            status = events[-1]["status_code"]
            raise APIError(events[-1]["error"], _status(events[-1]["error"]) if status == HTTPStatus.BAD_REQUEST
                           else status)
        return JSONResponse({"status": "success"})
    return StreamingResponse(_lines(queue, task), media_type="application/x-ndjson")


async def _drain(queue: asyncio.Queue) -> AsyncIterator[dict[str, Any]]:
    while (event := await queue.get()) is not None:
        yield event


async def _lines(queue: asyncio.Queue, task: asyncio.Task) -> AsyncIterator[str]:
    async for event in _drain(queue):
        event.pop("status_code", None)   # Ollama's error lines carry the message only
        yield json.dumps(event) + "\n"
    await task


def _status(message: str) -> int:
    lowered = message.lower()
    return HTTPStatus.NOT_FOUND if "not found" in lowered or "no file" in lowered or "unknown model" in lowered \
        else HTTPStatus.BAD_REQUEST


def _modelfile_text(body: CreateBody) -> str:
    """A Modelfile from /api/create's structured fields."""
    if not body.from_:
        raise APIError("from is required (or a modelfile)")
    license_text = "\n".join(body.license) if isinstance(body.license, list) else body.license
    messages = tuple((str(message.get("role", "")), str(message.get("content", ""))) for message in body.messages or ())
    return Modelfile(from_=body.from_, parameters=dict(body.parameters or {}), template=body.template,
                     system=body.system, messages=messages, license=license_text).to_text()
