"""`EngineClient`: the one interface through which the server, the Ollama routes and the terminal chat
use a model's engine.

It speaks in plain messages: prompts go through the `InputProcessor` (chat template, tokenizer, checks,
sampling defaults) on worker threads, never on the event loop or the step loop, and reach the engine as
`EngineRequest`s; outputs come back as `RequestOutput`s on a `RequestStream`. The step loop runs on a
thread of this process (`AsyncEngine`), or, with `--data-parallel-size K`, in K replica processes behind a
router (engine/data_parallel.py); because nothing else crosses the boundary, callers cannot tell.
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import itertools
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Mapping, Protocol, TypeVar

from pagedserve.config import EngineConfig
from pagedserve.engine.async_engine import (AsyncEngine, DeathHook, EngineOverloadedError, QueueLimits,
                                            RejectHook, RequestStream, StepHook)
from pagedserve.engine.llm_engine import EngineStats, LLMEngine, ModelInfo
from pagedserve.engine.lora import LoadedAdapter
from pagedserve.engine.processor import ChatOptions, ChatPrompt, EngineRequest, InputProcessor
from pagedserve.pooling_params import PoolingParams
from pagedserve.sampling_params import SamplingParams
from pagedserve.store.defaults import ModelDefaults, SamplingDefaults

_Result = TypeVar("_Result")

# Tokenizing and templating threads per model: requests are prepared while the engine steps.
_NUM_PROCESSOR_THREADS = 2


class EngineCore(Protocol):
    """Where checked requests run: one engine's step loop on a thread here (AsyncEngine), or data parallel
    replicas in processes of their own (DataParallelEngine)."""

    @property
    def is_running(self) -> bool: ...

    @property
    def num_waiting(self) -> int: ...

    def stats(self) -> EngineStats: ...

    async def add_request(self, request: EngineRequest) -> RequestStream: ...

    def abort(self, request_id: str) -> None: ...

    async def call_engine(self, method: str, *args: Any) -> Any: ...

    def shutdown(self, timeout: float = 10.0) -> None: ...


class EngineClient:
    def __init__(self, core: EngineCore, processor: InputProcessor, model_info: ModelInfo,
                 queue_limits: QueueLimits = QueueLimits(), on_reject: RejectHook | None = None) -> None:
        self.model_info = model_info
        self._processor = processor
        self._core = core
        self._max_waiting = queue_limits.max_waiting
        self._on_reject = on_reject
        self._num_preparing = 0   # requests past the queue check, not yet in the engine (event loop only)
        self._pool = ThreadPoolExecutor(_NUM_PROCESSOR_THREADS, thread_name_prefix="pagedserve-processor")
        self._ids = itertools.count()

    @classmethod
    def start(cls, config: EngineConfig, model_defaults: ModelDefaults = ModelDefaults(), *,
              sampling_overrides: Mapping[str, Any] | None = None, use_generation_config: bool = True,
              on_step: StepHook | None = None, on_dead: DeathHook | None = None,
              queue_limits: QueueLimits = QueueLimits(), on_reject: RejectHook | None = None,
              default_max_tokens: int | None = None) -> EngineClient:
        """Load the model (blocking: call it off the event loop) and start its step loop. `on_dead(error)`
        is called on the loop's thread if the loop ever ends other than by shutdown(); `on_reject(reason)`
        for each request refused or dropped by `queue_limits`. `default_max_tokens`: the output cap of
        requests that set none (None: up to the context).

        With `config.data_parallel_size` > 1 the engine is that many replica processes, each its own
        scheduler, model and KV cache; the processor stays here, so requests are checked once, in this process."""
        if config.data_parallel_size > 1:
            from pagedserve.engine.data_parallel import DataParallelEngine

            replicas = DataParallelEngine(config, on_step, on_dead, queue_limits.max_queue_time, on_reject)
            try:
                processor = InputProcessor.for_model(
                    config.model, replicas.tokenizer, replicas.limits, replicas.generation_config, model_defaults,
                    sampling_overrides=sampling_overrides, use_generation_config=use_generation_config,
                    default_max_tokens=default_max_tokens)
            except BaseException:
                replicas.shutdown()
                raise
            return cls(replicas, processor, replicas.model_info, queue_limits, on_reject)
        engine = LLMEngine(config)
        processor = InputProcessor.for_engine(engine, model_defaults, sampling_overrides=sampling_overrides,
                                              use_generation_config=use_generation_config,
                                              default_max_tokens=default_max_tokens)
        core = AsyncEngine(engine, on_step, on_dead, queue_limits.max_queue_time, on_reject)
        return cls(core, processor, engine.model_info(), queue_limits, on_reject)

    # ---- what the model is ----------------------------------------------------------------------

    @property
    def sampling_defaults(self) -> SamplingDefaults:
        return self._processor.sampling_defaults

    @property
    def model_defaults(self) -> ModelDefaults:
        return self._processor.model_defaults

    @property
    def chat_template(self) -> str | None:
        return self._processor.chat_template

    def stats(self) -> EngineStats:
        return self._core.stats()

    @property
    def is_running(self) -> bool:
        return self._core.is_running

    @property
    def num_waiting(self) -> int:
        """Requests accepted that do not run yet: being prepared, or waiting in the engine."""
        return self._num_preparing + self._core.num_waiting

    # ---- preparing requests (worker threads) ----------------------------------------------------

    async def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return await self._run(self._processor.tokenize, text, add_special_tokens)

    async def render_chat(self, messages: list[dict[str, Any]], options: ChatOptions = ChatOptions()) -> ChatPrompt:
        return await self._run(self._processor.render_chat, messages, options)

    async def decode(self, token_ids: list[int]) -> str:
        return await self._run(self._processor.decode, token_ids)

    async def token_strings(self, token_ids: list[int]) -> list[str]:
        return await self._run(self._processor.token_strings, token_ids)

    def decode_one(self, token_id: int) -> str:
        """One token's text (cheap enough for the event loop)."""
        return self._processor.tokenizer.decode([token_id])

    def check_token_ids(self, token_ids: list[int], param: str) -> None:
        self._processor.check_token_ids(token_ids, param)

    # ---- running requests -----------------------------------------------------------------------

    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str | None = None,
                       add_special_tokens: bool = True, lora_name: str | None = None) -> RequestStream:
        """Check and queue one request (`lora_name`: served by that loaded adapter); its outputs arrive on
        the returned stream. Raises ValueError (nothing queued) for a request the model cannot serve,
        EngineOverloadedError when as many requests wait already as the queue limits allow."""
        request_id = request_id or f"req-{next(self._ids)}"
        if self._max_waiting is not None and self.num_waiting >= self._max_waiting:
            if self._on_reject is not None:
                self._on_reject("queue_full")
            raise EngineOverloadedError("server busy, please try again. maximum pending requests exceeded "
                                        f"({self._max_waiting} wait already)", "queue_full")
        self._num_preparing += 1
        try:
            request = await self._run(self._processor.process, request_id, prompt, params, add_special_tokens,
                                      None, False, lora_name)
            if params.structured_outputs is not None:
                grammar = await self._processor.grammars.compile_async(params.structured_outputs)
                request = dataclasses.replace(request, grammar=grammar)
            return await self._core.add_request(request)
        finally:
            self._num_preparing -= 1

    async def embed(self, prompt: str | list[int], params: PoolingParams, request_id: str,
                    truncate: int | None = None, keep_end: bool = False, lora_name: str | None = None
                    ) -> RequestStream:
        """Check and queue one embedding request (`lora_name`: pooled through that loaded adapter); its one
        output (with `embedding`) arrives on the stream. Raises ValueError (nothing queued) for a request
        the model cannot serve."""
        process = functools.partial(self._processor.process_pooling, lora_name=lora_name)
        request = await self._run(process, request_id, prompt, params, truncate, keep_end)
        return await self._core.add_request(request)

    @property
    def is_embedding_model(self) -> bool:
        return self._processor.limits.pooler is not None

    def abort(self, request_id: str) -> None:
        self._core.abort(request_id)

    # ---- LoRA adapters (applied between steps) --------------------------------------------------

    async def add_lora(self, name: str, path: str) -> LoadedAdapter:
        """Raises LoRAError (a ValueError; nothing loaded) for a bad adapter or a full set of slots."""
        return await self._core.call_engine("add_lora", name, path)

    async def remove_lora(self, name: str) -> None:
        await self._core.call_engine("remove_lora", name)

    async def list_loras(self) -> list[LoadedAdapter]:
        return await self._core.call_engine("list_loras")

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the step loop (open streams end with a "shutting down" error) and the worker threads."""
        self._core.shutdown(timeout)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._processor.grammars.shutdown()

    async def _run(self, function: Callable[..., _Result], *args: Any) -> _Result:
        return await asyncio.get_running_loop().run_in_executor(self._pool, function, *args)
