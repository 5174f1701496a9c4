"""One model a server answers for: its engine's life and what requests need from it.

A model loads at start-up, or on its first request (`--lazy-load`, and every model of a models
directory); the request waits. Requests hold the model while they run (`acquire` / `release`); once
none does, it stays loaded for its keep-alive (`--keep-alive`, or a request's `keep_alive`), then
unloads: the engine thread stops and the weights and KV cache are freed. The next request reloads it.

Loading runs on a daemon thread, so a SIGTERM during a slow load still exits promptly.
"""
from __future__ import annotations

import asyncio
import ctypes
import gc
import logging
import math
import threading
import time
from http import HTTPStatus
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from pagedserve.config import EngineConfig, ServerConfig
from pagedserve.server.errors import APIError
from pagedserve.server.metrics import EngineMetrics, MetricFamilies
from pagedserve.store.models_dir import find_manifest, models_dir, resolve_named_model

if TYPE_CHECKING:
    from pagedserve.engine.engine_client import EngineClient

logger = logging.getLogger(__name__)


class ServedModel:
    def __init__(self, names: tuple[str, ...], requested: str, engine_config: EngineConfig,
                 server_config: ServerConfig, families: MetricFamilies, *, is_eager: bool, keep_alive: float,
                 on_engine_dead: Callable[[ServedModel, BaseException], None] | None = None) -> None:
        """`requested`: the model as the user named it; a created model's name loads its manifest's source.
        `on_engine_dead(model, error)` is called on the event loop if its engine loop dies."""
        self.names = names
        self.requested = requested
        self.manifest = find_manifest(requested, models_dir(engine_config.models_dir))
        self.engine_config, self.defaults = resolve_named_model(engine_config.replace(model=requested))
        self.is_eager = is_eager
        self.keep_alive = keep_alive                 # seconds; math.inf: never unload
        self.client: EngineClient | None = None      # while loaded
        self.load_error: BaseException | None = None   # a failed start-up load (the server then exits)
        self.is_starting = is_eager                  # its start-up load has not finished
        self.num_active = 0                          # requests holding it
        self.expires_at: float | None = None         # Unix time it unloads, if idle and mortal
        self.details: Any = None                     # ModelDetails, read once on demand
        self._server_config = server_config
        self._families = families
        self._on_engine_dead = on_engine_dead
        self.metrics = EngineMetrics(self.name, None, families)
        self._session_keep_alive = keep_alive
        self._is_unload_requested = False
        self._lock = asyncio.Lock()
        self._expiry: asyncio.TimerHandle | None = None
        self._unloading: asyncio.Task | None = None   # NOTE: held so the task is not collected mid-way

    @property
    def name(self) -> str:
        return self.names[0]

    @property
    def is_loaded(self) -> bool:
        return self.client is not None

    @property
    def engine(self) -> EngineClient:
        """The loaded model's engine client (requests hold the model, so it stays loaded while they run)."""
        if self.client is None:
            raise APIError("the model is not loaded", HTTPStatus.SERVICE_UNAVAILABLE)
        return self.client

    # ---- loading and unloading ------------------------------------------------------------------

    async def load(self) -> float:
        """Load the engine unless it is loaded; returns the seconds this call waited."""
        start = time.perf_counter()
        async with self._lock:
            if self.client is None:
                interval = None if self._server_config.disable_log_stats else self._server_config.log_stats_interval
                metrics = EngineMetrics(self.name, interval, self._families)
                client = await _in_daemon_thread(self._build, metrics, asyncio.get_running_loop())
                self._loaded(client, metrics)
        return time.perf_counter() - start

    def _build(self, metrics: EngineMetrics, loop: asyncio.AbstractEventLoop) -> EngineClient:
        from pagedserve.engine.async_engine import QueueLimits
        from pagedserve.engine.engine_client import EngineClient   # NOTE: here, so torch loads after the server listens

        def on_dead(error: BaseException) -> None:   # on the dead loop's thread
            try:
                loop.call_soon_threadsafe(self._engine_died, error)
            except RuntimeError:   # the event loop is gone too: the server is stopping anyway
                pass

        server_config = self._server_config
        return EngineClient.start(self.engine_config, self.defaults,
                                  sampling_overrides=server_config.generation_overrides,
                                  use_generation_config=server_config.generation_config == "auto",
                                  on_step=metrics.on_step, on_dead=on_dead,
                                  queue_limits=QueueLimits(server_config.max_waiting_requests,
                                                           server_config.max_queue_time),
                                  on_reject=metrics.record_rejected,
                                  default_max_tokens=server_config.default_max_tokens or None)

    def _engine_died(self, error: BaseException) -> None:
        if self._on_engine_dead is not None:
            self._on_engine_dead(self, error)

    def _loaded(self, client: EngineClient, metrics: EngineMetrics) -> None:
        self.client, self.metrics = client, metrics
        if self.num_active == 0:
            self._schedule_expiry()

    async def unload(self) -> bool:
        """Stop the engine and free its memory, unless a request holds the model; True if it unloaded."""
        async with self._lock:
            if self.client is None or self.num_active:
                return False
            client, self.client = self.client, None
            self.expires_at = None
            self._is_unload_requested = False
            self._cancel_expiry()
            await asyncio.to_thread(client.shutdown)
        del client
        self.metrics.record_unloaded()
        _release_memory()
        logger.info("unloaded %s", self.name)
        return True

    async def shutdown(self) -> None:
        """At server shutdown: stop the engine (open streams end with a "shutting down" error)."""
        self._cancel_expiry()
        if self.client is not None:
            await asyncio.to_thread(self.client.shutdown)

    # ---- requests holding the model -------------------------------------------------------------

    async def acquire(self) -> float:
        """Hold the model for a request, loading it first if needed; the seconds spent waiting for that.

        Every successful acquire needs one `release()`.
        """
        if self.load_error is not None:
            raise APIError(f"the model failed to load: {self.load_error}", HTTPStatus.INTERNAL_SERVER_ERROR)
        if self.is_starting:
            raise APIError("the model is loading", HTTPStatus.SERVICE_UNAVAILABLE)
        self.num_active += 1
        self._cancel_expiry()
        try:
            waited = await self.load()
        except BaseException as error:
            self.release()
            if isinstance(error, Exception) and not isinstance(error, APIError):
                logger.error("could not load %s: %s", self.name, error)
                raise APIError(f"model '{self.name}' failed to load: {error}",
                               HTTPStatus.INTERNAL_SERVER_ERROR) from error
            raise
        if self.client is None or not self.client.is_running:
            self.release()
            raise APIError("the engine has stopped", HTTPStatus.INTERNAL_SERVER_ERROR)
        return waited

    def release(self, keep_alive: float | None = None) -> None:
        """The request is done. `keep_alive`: how long the model then stays loaded, as the request
        asked (seconds; 0: unload now; math.inf: forever); None: the model's default."""
        self.num_active -= 1
        self._session_keep_alive = self.keep_alive if keep_alive is None else keep_alive
        if self._is_unload_requested:
            self._session_keep_alive = 0.0
        if self.num_active == 0:
            self._schedule_expiry()

    async def unload_when_idle(self) -> None:
        """Ollama's `keep_alive: 0` with nothing to answer: unload now, or as soon as no request holds it."""
        if self.client is None:
            return
        self._is_unload_requested = True
        if self.num_active == 0:
            await self.unload()

    def _schedule_expiry(self) -> None:
        self._cancel_expiry()
        keep_alive = self._session_keep_alive
        if self.client is None or math.isinf(keep_alive):
            self.expires_at = None
            return
        self.expires_at = time.time() + keep_alive
        self._expiry = asyncio.get_running_loop().call_later(keep_alive, self._expire)

    def _cancel_expiry(self) -> None:
        if self._expiry is not None:
            self._expiry.cancel()
            self._expiry = None

    def _expire(self) -> None:
        self._expiry = None
        if self.num_active == 0:
            self._unloading = asyncio.ensure_future(self.unload())

    # ---- what requests use ----------------------------------------------------------------------

    async def describe(self) -> Any:
        """The checkpoint's ModelDetails, read from its files' headers once; None for a hub model."""
        if self.details is None and _is_local(self.engine_config.model):
            from pagedserve.loader.source import resolve_model
            from pagedserve.loader.model_info import describe

            try:
                self.details = await asyncio.to_thread(lambda: describe(resolve_model(self.engine_config.model)))
            except ValueError as error:
                logger.warning("cannot read the details of %s: %s", self.name, error)
        return self.details

    @property
    def max_model_len(self) -> int | None:
        if self.client is not None:
            return self.client.model_info.max_model_len
        context_length = self.details.context_length if self.details is not None else None
        limits = [value for value in (self.engine_config.max_model_len, context_length) if value]
        return min(limits) if limits else None

    @property
    def chat_template(self) -> str | None:
        """The template chats render with: the loaded model's, else what its files or config say."""
        if self.client is not None:
            return self.client.chat_template
        if self.engine_config.chat_template:
            from pagedserve.loader.tokenizer import read_chat_template

            return read_chat_template(self.engine_config.chat_template)
        return self.details.chat_template if self.details is not None else None


async def _in_daemon_thread(function: Callable[..., Any], *args: Any) -> Any:
    """`function(*args)` on a daemon thread (the default executor's threads would hold up exit)."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result: Any, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        try:
            result, error = function(*args), None
        except BaseException as caught:   # noqa: BLE001 - handed to the awaiting coroutine
            result, error = None, caught
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:   # the loop is gone: the server stopped while the model loaded
            pass

    threading.Thread(target=run, name="pagedserve-load", daemon=True).start()
    return await future


def _is_local(model: str) -> bool:
    from pagedserve.loader.source import MODEL_ALIASES   # NOTE: here, so torch loads after the server listens

    return model in MODEL_ALIASES or Path(model).expanduser().exists()


def _release_memory() -> None:
    """Collect the engine's cycles and hand freed heap back to the system, so RSS drops after an unload."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):   # not glibc
        pass
