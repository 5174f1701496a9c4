"""What one server holds: its config, its models (a dict from every name a request may use to the
ServedModel answering it), metrics, and where it is in its life.

Uvicorn listens at once; the models named on the command line load in the background (`/health`
answers 503 until they are ready). Shutdown gives in-flight requests `shutdown_timeout` seconds,
then stops every engine, which ends each open stream with an error event.
"""
from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
import time
from http import HTTPStatus
from typing import Any, Awaitable, Callable, Sequence

from starlette.responses import Response

from pagedserve.config import EngineConfig, ServerConfig
from pagedserve.config.duration import parse_duration
from pagedserve.server.metrics import MetricFamilies
from pagedserve.store.models_dir import default_model_name, list_manifests, models_dir
from pagedserve.outputs import RequestOutput
from pagedserve.sampling_params import SamplingParams
from pagedserve.server.errors import APIError
from pagedserve.server.served_model import ServedModel
from pagedserve.server.streaming import ClosingStreamingResponse

logger = logging.getLogger(__name__)

# How long a model loaded on first use stays loaded when idle, unless --keep-alive says otherwise.
_LAZY_KEEP_ALIVE_SECONDS = 300.0


class ServerState:
    def __init__(self, server_config: ServerConfig, engine_config: EngineConfig,
                 on_fatal: Callable[[BaseException], None] | None = None,
                 model_names: Sequence[str] | None = None) -> None:
        """`model_names`: the models to serve (default: `engine_config.model`), each loaded with
        `engine_config`'s options; with `engine_config.models_dir` set, its models are served too."""
        self.server_config = server_config
        self.engine_config = engine_config
        # data parallel replicas: every series also says which engine (vLLM's engine="0", "1", ...)
        self.families = MetricFamilies(per_engine=engine_config.data_parallel_size > 1)
        self.models = build_models(server_config, engine_config, self.families,
                                   [engine_config.model] if model_names is None else list(model_names),
                                   self._engine_died)
        self.engine_error: BaseException | None = None   # an engine loop died: the server exits non-zero
        # LoRA adapter name -> (the model it adapts, its folder, the base name /v1/models shows as parent);
        # --lora-modules are loaded by the first model's engine, as vLLM serves one model.
        self.loras: dict[str, tuple[ServedModel, str, str | None]] = {
            name: (self.served_models[0], path, base) for name, path, base in engine_config.lora_adapters()}
        self.is_draining = False
        self.num_in_flight = 0
        self._on_fatal = on_fatal
        self._startup: asyncio.Task | None = None
        self._drain_task: asyncio.Task | None = None

    @property
    def served_models(self) -> list[ServedModel]:
        """Each model once, in the order they were named."""
        return list(dict.fromkeys(self.models.values()))

    @property
    def served_model_names(self) -> tuple[str, ...]:
        return tuple(name for model in self.served_models for name in model.names)

    def lookup(self, name: str | None) -> ServedModel | None:
        """The model a request names (also as `name:latest`); no name: the first one."""
        if name is None:
            return self.served_models[0]
        if name in self.loras:
            return self.loras[name][0]
        return self.models.get(name) or self.models.get(name.removesuffix(":latest"))

    def lora_name(self, name: str | None) -> str | None:
        """The LoRA adapter a request's model name selects, or None for a base model."""
        return name if name is not None and name in self.loras and name not in self.models else None

    # ---- models added and removed while serving (Ollama's /api/pull, /api/create, /api/copy, /api/delete)

    def add_model(self, name: str) -> ServedModel:
        """Serve `name` (a created model or any model name) from now on, loaded on first use."""
        existing = self.lookup(name)
        if existing is not None:
            return existing
        keep_alive = (parse_duration(self.server_config.keep_alive) if self.server_config.keep_alive is not None
                      else _LAZY_KEEP_ALIVE_SECONDS)
        model = ServedModel((name,), name, self.engine_config, self.server_config, self.families, is_eager=False,
                            keep_alive=keep_alive, on_engine_dead=self._engine_died)
        self.models[name] = model
        return model

    async def remove_model(self, model: ServedModel) -> None:
        """Stop serving `model` under every name (unloading it; requests in flight finish first)."""
        for name in [name for name, served in self.models.items() if served is model]:
            del self.models[name]
        await model.shutdown()

    async def make_room(self, loading: ServedModel) -> None:
        """Before `loading` loads: with --max-loaded-models (OLLAMA_MAX_LOADED_MODELS) reached, unload the
        idle model whose keep-alive runs out first, as Ollama does; if every loaded model is busy, load anyway."""
        limit = self.server_config.max_loaded_models
        if limit is None or loading.is_loaded:
            return
        loaded = [model for model in self.served_models if model.is_loaded and model is not loading]
        idle = sorted((model for model in loaded if not model.num_active),
                      key=lambda model: model.expires_at if model.expires_at is not None else math.inf)
        while len(loaded) >= limit and idle:
            victim = idle.pop(0)
            if await victim.unload():
                loaded.remove(victim)
                logger.info("unloaded %s to load %s (--max-loaded-models %d)", victim.name, loading.name, limit)

    # ---- start-up and readiness -----------------------------------------------------------------

    def start_loading(self) -> None:
        self._startup = asyncio.get_running_loop().create_task(self._load_at_startup())

    async def _load_at_startup(self) -> None:
        for model in self.served_models:
            if not model.is_eager:
                continue
            try:
                await model.load()
            except Exception as error:   # noqa: BLE001 - any load failure ends the server
                model.load_error, model.is_starting = error, False
                logger.error("could not load %s: %s", model.requested, error)
                if self._on_fatal is not None:
                    self._on_fatal(error)
                return
            model.is_starting = False
            if self.is_draining:
                await model.shutdown()

    def _engine_died(self, model: ServedModel, error: BaseException) -> None:
        """An engine loop died (on the event loop): /health answers 500 from now on and the server stops,
        exiting non-zero, so that a supervisor restarts it."""
        self.engine_error = error
        logger.critical("the engine of %s has stopped (%s: %s); the server shuts down", model.name,
                        type(error).__name__, error)
        if self._on_fatal is not None:
            self._on_fatal(error)

    def health(self) -> tuple[int, str]:
        """(HTTP status, reason) for /health: 200 once the models loaded at start-up are ready."""
        models = self.served_models
        for model in models:
            if model.load_error is not None:
                which = f" {model.name}" if len(models) > 1 else ""
                return HTTPStatus.INTERNAL_SERVER_ERROR, f"the model{which} failed to load: {model.load_error}"
        if self.engine_error is not None:
            return HTTPStatus.INTERNAL_SERVER_ERROR, "the engine has stopped"
        if self.is_draining:
            return HTTPStatus.SERVICE_UNAVAILABLE, "the server is shutting down"
        if any(model.is_starting for model in models):
            return HTTPStatus.SERVICE_UNAVAILABLE, "the model is loading"
        if any(model.client is not None and not model.client.is_running for model in models):
            return HTTPStatus.INTERNAL_SERVER_ERROR, "the engine has stopped"
        return HTTPStatus.OK, "ok"

    # ---- requests -------------------------------------------------------------------------------

    def check_request_template(self, chat_template: str | None, chat_template_kwargs: dict[str, Any] | None) -> None:
        """400 for a chat template sent with a request, unless --trust-request-chat-template (vLLM's words)."""
        if self.server_config.trust_request_chat_template:
            return
        if chat_template is not None or (chat_template_kwargs and chat_template_kwargs.get("chat_template") is not None):
            raise APIError("Chat template is passed with request, but --trust-request-chat-template is not set. "
                           "Refused request with untrusted chat template.", HTTPStatus.BAD_REQUEST)

    async def respond(self, model: ServedModel, handler: Callable[[float], Awaitable[Response]],
                      keep_alive: float | None = None) -> Response:
        """`handler(seconds waited for the model to load)` with the model held until its response is
        sent (a stream: until it closes). `keep_alive`: the request's, if it gave one."""
        if self.is_draining:
            raise APIError("the server is shutting down", HTTPStatus.SERVICE_UNAVAILABLE)
        await self.make_room(model)
        waited = await model.acquire()
        try:
            response = await handler(waited)
        except BaseException:
            model.release(keep_alive)
            raise
        if isinstance(response, ClosingStreamingResponse):
            response.also_on_close(lambda: model.release(keep_alive))
        else:
            model.release(keep_alive)
        return response

    def track(self, model: ServedModel, streams: list[Any]) -> RequestTracker:
        """Count requests in flight (shutdown waits for them) until the tracker is closed."""
        self.num_in_flight += 1
        return RequestTracker(self, model, streams)

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
        await self.stop_engines()

    async def stop_engines(self) -> None:
        """Stop every engine thread; streams still open end with a "shutting down" error."""
        for model in self.served_models:
            await model.shutdown()

    async def close(self) -> None:
        """At lifespan shutdown, after uvicorn has closed the connections."""
        self.is_draining = True
        for task in (self._drain_task, self._startup):
            if task is not None and not task.done():
                task.cancel()
        await self.stop_engines()


class RequestTracker:
    """One HTTP request's engine requests. `close()` (idempotent) aborts whatever has not finished
    and counts it as aborted unless the handler marked the request `completed`."""

    def __init__(self, state: ServerState, model: ServedModel, streams: list[Any]) -> None:
        self._state = state
        self._model = model
        self._streams = streams
        self.completed = False
        self.failure: str | None = None   # why it ended early, when not because the client left
        self._is_closed = False

    def fail(self, error: BaseException) -> None:
        """The request ended with `error` (for the log line; the client got it as an answer or an event)."""
        self.failure = f"{type(error).__name__}: {error}"

    def close(self) -> None:
        if self._is_closed:
            return
        self._is_closed = True
        self._state.num_in_flight -= 1
        if not self.completed:
            self._model.metrics.record_aborted(getattr(self._streams[0], "engine_index", 0) if self._streams else 0)
            request_ids = ", ".join(stream.request_id for stream in self._streams)
            logger.info("Aborted request %s: %s", request_ids, self.failure or "the client disconnected")
        for stream in self._streams:
            stream.abort()


def build_models(server_config: ServerConfig, engine_config: EngineConfig, families: MetricFamilies,
                 model_names: list[str],
                 on_engine_dead: Callable[[ServedModel, BaseException], None] | None = None
                 ) -> dict[str, ServedModel]:
    """Every name a request may use -> its model: those named (loaded at start-up unless --lazy-load),
    then those of an explicitly given models directory (loaded on first use)."""
    directory = models_dir(engine_config.models_dir)
    if server_config.served_model_name and len(model_names) > 1:
        raise ValueError("--served-model-name names a single model; with several, each is served under its own "
                         "name (create a model with `pagedserve create NAME` to choose one)")
    # (model, loads at start-up, names it is served under unless the default)
    named = [(name, not server_config.lazy_load, server_config.served_model_name) for name in model_names]
    if engine_config.models_dir:
        named += [(manifest.name, False, ()) for manifest in list_manifests(directory)
                  if manifest.name not in model_names]
    if not named:
        raise ValueError(f"no model to serve: name one, or create models in {directory}")
    models: dict[str, ServedModel] = {}
    for requested, is_eager, chosen_names in named:
        names = chosen_names or (default_model_name(requested, directory),)
        keep_alive = (parse_duration(server_config.keep_alive) if server_config.keep_alive is not None
                      else math.inf if is_eager else _LAZY_KEEP_ALIVE_SECONDS)
        model = ServedModel(tuple(names), requested, engine_config, server_config, families, is_eager=is_eager,
                            keep_alive=keep_alive, on_engine_dead=on_engine_dead)
        # NOTE: unless names were chosen, the model as typed (e.g. a path) is accepted too, as vLLM serves it.
        accepted = names if chosen_names else [*names, requested]
        for name in dict.fromkeys(accepted):
            if name in models:
                raise ValueError(f"two models would be served as {name!r}")
            models[name] = model
    return models


def _changed_fields(params: SamplingParams) -> str:
    """The sampling params that differ from their defaults, compactly, for the request log."""
    defaults = SamplingParams()
    changed = [f"{item.name}={getattr(params, item.name)!r}" for item in dataclasses.fields(params)
               if item.name != "output_kind" and getattr(params, item.name) != getattr(defaults, item.name)]
    return ", ".join(changed) or "defaults"
