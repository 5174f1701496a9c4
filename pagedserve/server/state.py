"""What one server holds: its configs, the engine once loaded, metrics, and where it is in its life.

The engine loads on a daemon thread so uvicorn listens at once (`/health` answers 503 meanwhile)
and a SIGTERM during a slow load still exits promptly. Shutdown gives in-flight requests
`shutdown_timeout` seconds, then stops the engine, which ends every open stream with an error event.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
import time
from http import HTTPStatus
from typing import Any, Callable

from pagedserve.config import EngineConfig, ServerConfig
from pagedserve.metrics import EngineMetrics
from pagedserve.outputs import RequestOutput
from pagedserve.sampling_params import SamplingParams
from pagedserve.server.errors import APIError

logger = logging.getLogger(__name__)


class ServerState:
    def __init__(self, server_config: ServerConfig, engine_config: EngineConfig,
                 on_fatal: Callable[[BaseException], None] | None = None) -> None:
        self.server_config = server_config
        self.engine_config = engine_config
        self.served_model_names = server_config.served_model_name or (engine_config.model,)
        self.metrics = EngineMetrics(self.served_model_names[0],
                                     None if server_config.disable_log_stats else server_config.log_stats_interval)
        self.engine: Any = None            # LLMEngine, once loaded
        self.async_engine: Any = None      # AsyncEngine, once loaded
        self.generation_defaults: dict[str, Any] = {}
        self.load_error: BaseException | None = None
        self.is_draining = False
        self.num_in_flight = 0
        self._on_fatal = on_fatal
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None

    # ---- loading --------------------------------------------------------------------------------

    def start_loading(self) -> None:
        self._loop = asyncio.get_running_loop()
        threading.Thread(target=self._load, name="pagedserve-load", daemon=True).start()

    def _load(self) -> None:
        from pagedserve.engine.async_engine import AsyncEngine
        from pagedserve.engine.llm_engine import LLMEngine

        try:
            engine = LLMEngine(self.engine_config)
        except BaseException as error:   # noqa: BLE001 - any load failure ends the server
            self._call_on_loop(self._load_failed, error)
            return
        async_engine = AsyncEngine(engine, on_step=self.metrics.on_step)
        self._call_on_loop(self._loaded, engine, async_engine)

    def _call_on_loop(self, callback: Callable[..., None], *args: Any) -> None:
        try:
            self._loop.call_soon_threadsafe(callback, *args)
        except RuntimeError:   # the loop is gone: the server stopped while the model loaded
            pass

    def _loaded(self, engine: Any, async_engine: Any) -> None:
        self.engine, self.async_engine = engine, async_engine
        from_model = engine.generation_defaults if self.server_config.generation_config == "auto" else {}
        self.generation_defaults = {**from_model, **self.server_config.generation_overrides}
        if self.generation_defaults:
            logger.info("sampling defaults for fields a request leaves out: %s", self.generation_defaults)
        if self.is_draining:
            async_engine.shutdown()

    def _load_failed(self, error: BaseException) -> None:
        self.load_error = error
        logger.error("could not load %s: %s", self.engine_config.model, error)
        if self._on_fatal is not None:
            self._on_fatal(error)

    # ---- readiness ------------------------------------------------------------------------------

    def health(self) -> tuple[int, str]:
        """(HTTP status, reason) for /health."""
        if self.load_error is not None:
            return HTTPStatus.INTERNAL_SERVER_ERROR, f"the model failed to load: {self.load_error}"
        if self.is_draining:
            return HTTPStatus.SERVICE_UNAVAILABLE, "the server is shutting down"
        if self.async_engine is None:
            return HTTPStatus.SERVICE_UNAVAILABLE, "the model is loading"
        if not self.async_engine.is_running:
            return HTTPStatus.INTERNAL_SERVER_ERROR, "the engine has stopped"
        return HTTPStatus.OK, "ok"

    def require_engine(self) -> Any:
        """The AsyncEngine, or an APIError (503/500) saying why there is none."""
        status, reason = self.health()
        if status != HTTPStatus.OK:
            raise APIError(reason, status)
        return self.async_engine

    def check_params(self, params: SamplingParams) -> None:
        """What the engine would refuse, refused here with the field named."""
        max_num_seqs = self.engine_config.max_num_seqs
        if params.n > max_num_seqs:
            raise APIError(f"n must be at most {max_num_seqs} (--max-num-seqs), got {params.n}", param="n")
        vocab_size = self.engine.model_config.vocab_size
        for token_id in params.logit_bias or {}:
            if token_id >= vocab_size:
                raise APIError(f"logit_bias token id {token_id} is out of vocabulary (size {vocab_size})",
                               param="logit_bias")

    def check_token_ids(self, token_ids: list[int], param: str) -> None:
        vocab_size = self.engine.model_config.vocab_size
        bad = [token_id for token_id in token_ids if not 0 <= token_id < vocab_size]
        if bad:
            raise APIError(f"token ids must be in [0, {vocab_size}); got {bad[0]}", param=param)

    @property
    def max_model_len(self) -> int | None:
        return self.engine.max_model_len if self.engine is not None else self.engine_config.max_model_len

    # ---- requests in flight ---------------------------------------------------------------------

    def track(self, streams: list[Any]) -> RequestTracker:
        """Count requests in flight (shutdown waits for them) until the tracker is closed."""
        self.num_in_flight += 1
        return RequestTracker(self, streams)

    def log_received(self, request_id: str, prompt: str | list[int], params: SamplingParams) -> None:
        if self.server_config.disable_log_requests:
            return
        max_len = self.server_config.max_log_len
        shown = prompt if max_len is None else prompt[:max_len]
        logger.info("Received request %s: prompt: %r, params: %s", request_id, shown, _changed_fields(params))

    def log_finished(self, request_id: str, outputs: list[RequestOutput | None]) -> None:
        if self.server_config.disable_log_requests:
            return
        finished = [output for output in outputs if output is not None]
        num_prompt = sum(len(output.prompt_token_ids) for output in finished)
        num_cached = sum(output.num_cached_tokens for output in finished)
        num_generated = sum(c.num_output_tokens for output in finished for c in output.outputs)
        reasons = sorted({str(c.finish_reason) for output in finished for c in output.outputs})
        arrival = min((o.metrics.arrival_time for o in finished if o.metrics is not None), default=time.time())
        logger.info("Finished request %s: %d prompt tokens (%d cached), %d generated, finish_reason %s, %.2f s",
                    request_id, num_prompt, num_cached, num_generated, "/".join(reasons), time.time() - arrival)

    # ---- shutdown -------------------------------------------------------------------------------

    def begin_drain(self) -> None:
        """On SIGTERM/SIGINT (on the event loop): refuse new requests, give open ones time to finish."""
        if self.is_draining:
            return
        self.is_draining = True
        timeout = self.server_config.shutdown_timeout
        logger.info("shutting down: %d request(s) in flight get up to %.0f s to finish", self.num_in_flight, timeout)
        self._drain_task = asyncio.get_running_loop().create_task(self._drain(timeout))

    async def _drain(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self.stop_engine()

    async def stop_engine(self) -> None:
        """Stop the engine thread; streams still open end with a "shutting down" error."""
        if self.async_engine is not None:
            await asyncio.to_thread(self.async_engine.shutdown)

    async def close(self) -> None:
        """At lifespan shutdown, after uvicorn has closed the connections."""
        self.is_draining = True
        if self._drain_task is not None and not self._drain_task.done():
            self._drain_task.cancel()
        await self.stop_engine()


class RequestTracker:
    """One HTTP request's engine requests. `close()` (idempotent) aborts whatever has not finished
    and counts it as aborted unless the handler marked the request `completed`."""

    def __init__(self, state: ServerState, streams: list[Any]) -> None:
        self._state = state
        self._streams = streams
        self.completed = False
        self._is_closed = False

    def close(self) -> None:
        if self._is_closed:
            return
        self._is_closed = True
        self._state.num_in_flight -= 1
        if not self.completed:
            self._state.metrics.record_aborted()
        for stream in self._streams:
            stream.abort()


def _changed_fields(params: SamplingParams) -> str:
    """The sampling params that differ from their defaults, compactly, for the request log."""
    defaults = SamplingParams()
    changed = [f"{item.name}={getattr(params, item.name)!r}" for item in dataclasses.fields(params)
               if item.name != "output_kind" and getattr(params, item.name) != getattr(defaults, item.name)]
    return ", ".join(changed) or "defaults"
