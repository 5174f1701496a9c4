"""The FastAPI app: open routes (/health, /version, /metrics), the OpenAI and Ollama routes, CORS, errors,
and the lifespan that loads the models in the background and stops their engines at shutdown."""
from __future__ import annotations

import re
from contextlib import asynccontextmanager
from http import HTTPStatus
from typing import AsyncIterator, Callable, Sequence

from fastapi import APIRouter, FastAPI, Request
from fastapi.middleware.cors import CORSMiddleware
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.responses import JSONResponse, Response

from pagedserve import __version__
from pagedserve.config import EngineConfig, ServerConfig
from pagedserve.server import webui
from pagedserve.server.api import server_state
from pagedserve.server.ollama import routes as ollama_routes
from pagedserve.server.openai import routes as openai_routes
from pagedserve.server.errors import error_body, install_error_handlers
from pagedserve.server.state import ServerState

open_router = APIRouter()


@open_router.get("/health")
async def health(request: Request) -> Response:
    """200 once the models loaded at start-up are ready; 503 while loading or shutting down; 500 if broken."""
    status, reason = server_state(request).health()
    if status == HTTPStatus.OK:
        return Response(status_code=HTTPStatus.OK)
    return JSONResponse(error_body(reason, status), status_code=status)


@open_router.get("/version")
async def version() -> JSONResponse:
    return JSONResponse({"version": __version__})


@open_router.get("/metrics")
async def metrics(request: Request) -> Response:
    registry = server_state(request).families.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


# What Ollama always allows (envconfig.AllowedOrigins): pages served from this machine, and desktop
# apps' own schemes.
_LOCAL_HOSTS = ("localhost", "127.0.0.1", "0.0.0.0", "[::1]")
_APP_SCHEMES = ("app", "file", "tauri", "vscode-webview", "vscode-file")


def cors_origins(allowed: Sequence[str]) -> tuple[list[str], str | None]:
    """(exact origins, a pattern for the rest) for CORS: localhost origins and the `allowed` ones; "*"
    alone means any origin, and inside an origin any run of characters."""
    if "*" in allowed:
        return ["*"], None
    hosts = "|".join(re.escape(host) for host in _LOCAL_HOSTS)
    patterns = [rf"https?://(?:{hosts})(?::\d+)?", rf"(?:{'|'.join(_APP_SCHEMES)})://.*"]
    patterns += [re.escape(origin).replace(r"\*", "[^/]*") for origin in allowed if "*" in origin]
    return [origin for origin in allowed if "*" not in origin], "|".join(f"(?:{pattern})" for pattern in patterns)


def create_app(server_config: ServerConfig, engine_config: EngineConfig,
               on_fatal: Callable[[BaseException], None] | None = None,
               model_names: Sequence[str] | None = None) -> FastAPI:
    """The app serving `model_names` (default: `engine_config.model`) with `engine_config`'s options, and
    the models of `engine_config.models_dir` when it is given. `on_fatal(error)` is called (on the event
    loop) if a model loaded at start-up fails to load."""
    state = ServerState(server_config, engine_config, on_fatal, model_names)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        state.start_loading()
        yield
        await state.close()

    app = FastAPI(title="pagedserve", version=__version__, lifespan=lifespan)
    app.state.server = state
    install_error_handlers(app)
    origins, origin_pattern = cors_origins(server_config.allowed_origins)
    app.add_middleware(CORSMiddleware, allow_origins=origins, allow_origin_regex=origin_pattern,
                       allow_credentials=server_config.allow_credentials,
                       allow_methods=list(server_config.allowed_methods),
                       allow_headers=list(server_config.allowed_headers))
    app.include_router(open_router)
    app.include_router(openai_routes.router)
    app.include_router(ollama_routes.open_router)
    app.include_router(ollama_routes.router)
    app.include_router(webui.build_router(server_config.enable_webui))
    return app
