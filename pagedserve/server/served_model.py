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
from typing import Any, Callable

from pagedserve.loader.chat_template import render_chat_prompt
from pagedserve.config import EngineConfig, ServerConfig
from pagedserve.server.metrics import EngineMetrics, MetricFamilies
from pagedserve.store.models_dir import find_manifest, models_dir, resolve_named_model
from pagedserve.sampling_params import SamplingParams
from pagedserve.server.errors import APIError

logger = logging.getLogger(__name__)


class ServedModel:
    def __init__(self, names: tuple[str, ...], requested: str, engine_config: EngineConfig,
                 server_config: ServerConfig, families: MetricFamilies, *, is_eager: bool, keep_alive: float) -> None:
        """`requested`: the model as the user named it; a created model's name loads its manifest's source."""
        self.names = names
        self.requested = requested
        self.manifest = find_manifest(requested, models_dir(engine_config.models_dir))
        self.engine_config, self.defaults = resolve_named_model(engine_config.replace(model=requested))
        self.is_eager = is_eager
        self.keep_alive = keep_alive                 # seconds; math.inf: never unload
        self.engine: Any = None                      # LLMEngine, while loaded
        self.async_engine: Any = None                # AsyncEngine, while loaded
        self.generation_defaults: dict[str, Any] = {}
        self.load_error: BaseException | None = None   # a failed start-up load (the server then exits)
        self.is_starting = is_eager                  # its start-up load has not finished
        self.num_active = 0                          # requests holding it
        self.expires_at: float | None = None         # Unix time it unloads, if idle and mortal
        self.details: Any = None                     # ModelDetails, read once on demand
        self._server_config = server_config
        self._families = families
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
        return self.async_engine is not None

    # ---- loading and unloading ------------------------------------------------------------------

    async def load(self) -> float:
        """Load the engine unless it is loaded; returns the seconds this call waited."""
        start = time.perf_counter()
        async with self._lock:
            if self.async_engine is None:
                interval = None if self._server_config.disable_log_stats else self._server_config.log_stats_interval
                metrics = EngineMetrics(self.name, interval, self._families)
                engine, async_engine = await _in_daemon_thread(self._build, metrics)
                self._loaded(engine, async_engine, metrics)
        return time.perf_counter() - start

    def _build(self, metrics: EngineMetrics) -> tuple[Any, Any]:
        from pagedserve.engine.async_engine import AsyncEngine
        from pagedserve.engine.llm_engine import LLMEngine

        engine = LLMEngine(self.engine_config)
        return engine, AsyncEngine(engine, on_step=metrics.on_step)

    def _loaded(self, engine: Any, async_engine: Any, metrics: EngineMetrics) -> None:
        self.engine, self.async_engine, self.metrics = engine, async_engine, metrics
        from_model = engine.generation_defaults if self._server_config.generation_config == "auto" else {}
        self.generation_defaults = {**from_model, **self.defaults.generation,
                                    **self._server_config.generation_overrides}
        if self.generation_defaults:
            logger.info("%s: sampling defaults for fields a request leaves out: %s", self.name,
                        self.generation_defaults)
        if self.num_active == 0:
            self._schedule_expiry()

    async def unload(self) -> bool:
        """Stop the engine and free its memory, unless a request holds the model; True if it unloaded."""
        async with self._lock:
            if self.async_engine is None or self.num_active:
                return False
            async_engine = self.async_engine
            self.engine = self.async_engine = None
            self.expires_at = None
            self._is_unload_requested = False
            self._cancel_expiry()
            await asyncio.to_thread(async_engine.shutdown)
        del async_engine
        self.metrics.record_unloaded()
        _release_memory()
        logger.info("unloaded %s", self.name)
        return True

    async def shutdown(self) -> None:
        """At server shutdown: stop the engine (open streams end with a "shutting down" error)."""
        self._cancel_expiry()
        if self.async_engine is not None:
            await asyncio.to_thread(self.async_engine.shutdown)

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
        if not self.async_engine.is_running:
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
        if self.async_engine is None:
            return
        self._is_unload_requested = True
        if self.num_active == 0:
            await self.unload()

    def _schedule_expiry(self) -> None:
        self._cancel_expiry()
        keep_alive = self._session_keep_alive
        if self.async_engine is None or math.isinf(keep_alive):
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
        if self.engine is not None:
            return self.engine.max_model_len
        context_length = self.details.context_length if self.details is not None else None
        limits = [value for value in (self.engine_config.max_model_len, context_length) if value]
        return min(limits) if limits else None

    @property
    def size_bytes(self) -> int:
        """Weights and KV cache of the loaded engine, in bytes."""
        runner, block_size = self.engine.runner, self.engine.config.block_size
        return runner.num_parameter_bytes + self.engine.block_manager.num_blocks * runner.kv_bytes_per_block(block_size)

    def chat_prompt(self, messages: list[dict[str, Any]], add_special_tokens: bool = False, with_defaults: bool = True,
                    **template_options: Any) -> tuple[str, list[int]]:
        """The rendered chat prompt and its tokens; `with_defaults`: after the model's system prompt and
        opening messages."""
        tokenizer = self.engine.tokenizer
        if with_defaults:
            messages = self.defaults.chat_messages(messages)
        prompt = render_chat_prompt(tokenizer, messages, **template_options)
        return prompt, tokenizer.encode(prompt, add_special_tokens=add_special_tokens)

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
