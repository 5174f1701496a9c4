"""Running the app under uvicorn until SIGINT/SIGTERM, and exiting 0 after a clean shutdown."""
from __future__ import annotations

import asyncio
import logging
import math
import os
import socket
import threading
from types import FrameType
from typing import Sequence

import uvicorn

from pagedserve import __version__
from pagedserve.config import EngineConfig, ServerConfig
from pagedserve.config.duration import format_duration
from pagedserve.server.app import create_app
from pagedserve.server.connections import HeaderTimeoutProtocol
from pagedserve.server.served_model import ServedModel
from pagedserve.server.state import ServerState

logger = logging.getLogger("pagedserve.server")

# Beyond shutdown_timeout, how long uvicorn waits for connections before cancelling them.
_SHUTDOWN_MARGIN_SECONDS = 5.0
# After a fatal error, beyond uvicorn's graceful shutdown, how long stopping the engines may take.
_FORCED_EXIT_MARGIN_SECONDS = 10.0
# The exit status after a fatal error (a model failed to load at start-up, an engine loop died).
FATAL_EXIT_CODE = 1


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self._state = state
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)
        if self.started and not self.should_exit:
            logger.info("%s", _startup_line(self._state, self._bound_port()))

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # NOTE: replaces uvicorn's, which re-raises the signal once shut down, so a clean SIGTERM
        # shutdown would still end the process by the signal (exit code 143) instead of 0.
        if self.should_exit:
            self.force_exit = True
            return
        self.should_exit = True
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._state.begin_drain)

    def stop(self, _error: BaseException) -> None:
        """A fatal error (a start-up load failed, an engine loop died): shut down now, and should that
        hang, end the process anyway once the graceful shutdown's time is up."""
        self.should_exit = True
        bound = self.config.timeout_graceful_shutdown or 0
        timer = threading.Timer(bound + _FORCED_EXIT_MARGIN_SECONDS, _force_exit)
        timer.daemon = True
        timer.start()

    def _bound_port(self) -> int:
        for server in self.servers:
            for sock in server.sockets:
                return sock.getsockname()[1]
        return self.config.port


def run_server(server_config: ServerConfig, engine_config: EngineConfig,
               model_names: Sequence[str] | None = None) -> int:
    """Serve until told to stop; 0 after a clean shutdown, 1 if a model failed to load at start-up or an
    engine loop died."""
    holder: list[_Server] = []
    app = create_app(server_config, engine_config, on_fatal=lambda error: holder[0].stop(error),
                     model_names=model_names)
    config = uvicorn.Config(
        app, host=server_config.host, port=server_config.port, log_config=None,
        log_level=server_config.uvicorn_log_level, access_log=not server_config.disable_uvicorn_access_log,
        ssl_keyfile=server_config.ssl_keyfile, ssl_certfile=server_config.ssl_certfile,
        http=HeaderTimeoutProtocol.factory(server_config.timeout_request_header),  # type: ignore[arg-type]
        timeout_keep_alive=server_config.timeout_keep_alive,
        timeout_graceful_shutdown=int(server_config.shutdown_timeout + _SHUTDOWN_MARGIN_SECONDS))
    server = _Server(config, app.state.server)
    holder.append(server)
    server.run()
    state: ServerState = app.state.server
    failed = state.engine_error is not None or any(model.load_error is not None for model in state.served_models)
    return FATAL_EXIT_CODE if failed else 0


def _force_exit() -> None:
    logger.critical("the server did not shut down in time after a fatal error; exiting now")
    logging.shutdown()
    os._exit(FATAL_EXIT_CODE)


def _startup_line(state: ServerState, port: int) -> str:
    config = state.server_config
    scheme = "https" if config.ssl_certfile else "http"
    served = "; ".join(_served(model) for model in state.served_models)
    access = "API key required" if config.api_key else "no API key"
    return (f"pagedserve {__version__} listening on {scheme}://{config.host}:{port}, serving {served} ({access}); "
            "models load in the background and GET /health answers 200 once those loaded at start-up are ready")


def _served(model: ServedModel) -> str:
    notes = [] if model.is_eager else ["loads on first use"]
    if not math.isinf(model.keep_alive):
        notes.append(f"unloads after {format_duration(model.keep_alive)} idle")
    names = ", ".join(repr(name) for name in model.names)
    return f"{model.requested} as {names}" + (f" ({', '.join(notes)})" if notes else "")
