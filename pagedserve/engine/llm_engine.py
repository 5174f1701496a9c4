"""The engine: add_request / abort_request / step, on one thread."""
from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable

from pagedserve.config import EngineConfig, ModelConfig, token_ids
from pagedserve.config.pooler import PoolerConfig, resolve_pooler_config
from pagedserve.engine.block_manager import BlockManager
from pagedserve.engine.detokenizer import IncrementalDetokenizer
from pagedserve.engine.lora import LoadedAdapter, LoRAError, LoRAManager
from pagedserve.engine.model_runner import ModelRunner, ModelRunnerOutput
from pagedserve.engine.platform import Platform
from pagedserve.engine.processor import EngineRequest, ModelLimits
from pagedserve.engine.scheduler import Scheduler, SchedulerOutput
from pagedserve.engine.sequence import Sequence, SequenceStatus
from pagedserve.engine.structured_output import GrammarMatchers
from pagedserve.executor import Executor, PendingOutput, make_executor
from pagedserve.layers.sampler import SamplingRow, TokenLogprobs
from pagedserve.loader.checkpoint import open_checkpoint
from pagedserve.outputs import CompletionOutput, Logprob, PositionLogprobs, RequestMetrics, RequestOutput
from pagedserve.pooling_params import PoolingParams
from pagedserve.sampling_params import OutputKind, SamplingParams

logger = logging.getLogger(__name__)

# Token budget of a step when the user sets none. On a CPU a step of 512 prompt tokens already runs the
# GEMMs near full speed, and smaller steps interleave waiting prompts with running decodes sooner:
# the median time to first token under load drops and decodes stall less behind long prompts.
DEFAULT_MAX_NUM_BATCHED_TOKENS = {"cpu": 512, "cuda": 2048}
POOLING_MAX_NUM_BATCHED_TOKENS = 8192


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    seqs: list[Sequence]
    detokenizers: list[IncrementalDetokenizer]
    metrics: RequestMetrics
    prompt_logprobs: list[PositionLogprobs | None] | None
    num_sent_tokens: list[int] = field(default_factory=list)
    pooling: PoolingParams | None = None       # an embedding request

    @property
    def is_finished(self) -> bool:
        return all(seq.is_finished for seq in self.seqs)


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the engine's load and lifetime counters (tokens), for logs and metrics."""

    num_running: int
    num_waiting: int
    kv_cache_usage: float
    num_prompt_tokens: int           # prompt tokens computed (cache hits excluded)
    num_generation_tokens: int
    num_prefix_cache_queries: int
    num_prefix_cache_hits: int
    num_preemptions: int
    num_free_blocks: int
    num_blocks: int


@dataclass(frozen=True)
class ModelInfo:
    """What clients may know about a loaded model: its limits, where it runs, and what it holds in memory."""

    model: str                        # as the engine config named it
    architecture: str
    max_model_len: int
    vocab_size: int
    device: str                      # "cpu", "cuda:0", ...
    dtype: str
    num_parameters: int
    weight_bytes: int
    kv_cache_bytes: int

    @property
    def memory_bytes(self) -> int:
        """Weights and KV cache."""
        return self.weight_bytes + self.kv_cache_bytes


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        if config.data_parallel_size > 1:
            raise ValueError(f"data_parallel_size {config.data_parallel_size}: an LLMEngine (and the offline LLM) "
                             "is one engine; data parallel replicas are served by `pagedserve serve` (EngineClient)")
        start = time.perf_counter()
        self.config = config
        checkpoint = open_checkpoint(config)
        self.model_config: ModelConfig = checkpoint.model_config
        self.tokenizer = checkpoint.tokenizer
        # generation_config.json's values (sampling defaults, end ids); {} for a GGUF
        self.generation_config: dict[str, Any] = checkpoint.generation_defaults
        is_quantized = checkpoint.quantization is not None
        # None: a generative engine; else every request is pooled into an embedding (--runner pooling)
        self.pooler_config: PoolerConfig | None = None
        if checkpoint.pooler_config is not None:
            self.pooler_config = resolve_pooler_config(config.runner_choice, config.convert, self.model_config.is_causal,
                                                       self.model_config.architecture, checkpoint.pooler_config)
        platform_config = config
        # (config.json without a dtype: the float32 transformers saved by default, as all-MiniLM-L6-v2's)
        if (self.pooler_config is not None and config.dtype == "auto" and not is_quantized
                and self.model_config.checkpoint_dtype in (None, "float32")):
            # NOTE: an embedding is compared by cosine with the reference model's; bfloat16 moves it by ~1e-4,
            # float32 keeps it within 1e-6 (and encoders are small enough for float32 to cost little).
            platform_config = config.replace(dtype="float32")
        # one rank here, or rank 0 (the driver) of a tensor / pipeline parallel model
        self.executor: Executor = make_executor(platform_config, checkpoint, is_quantized, self.pooler_config)
        self.platform: Platform = self.executor.platform
        self.runner: ModelRunner = self.executor.driver
        self.lora: LoRAManager | None = None
        try:
            if config.enable_lora:
                # NOTE: adapters live on the driver's model only; config refuses LoRA with more than one rank.
                self.lora = LoRAManager(self.runner.model, config.max_loras, config.max_lora_rank,
                                        self.platform.dtype, self.platform.device)
                for name, path, _base in config.lora_adapters():
                    self.lora.add(name, path)
            self.max_model_len = self._resolve_max_model_len()
            num_blocks = self._resolve_num_blocks()
            self.executor.allocate_kv_cache(num_blocks, config.block_size)
        except BaseException:
            self.executor.shutdown()
            raise
        # Encoders and MEAN/CLS pooling read a prompt's rows all at once: no chunks, no cached prefixes.
        whole_prompts = self.pooler_config is not None and (not self.model_config.is_causal
                                                            or self.pooler_config.needs_whole_prompt)
        self.block_manager = BlockManager(num_blocks, config.block_size,
                                          config.enable_prefix_caching and not whole_prompts)
        budget = config.max_num_batched_tokens or DEFAULT_MAX_NUM_BATCHED_TOKENS.get(self.platform.device.type, 2048)
        if whole_prompts and config.max_num_batched_tokens is None:
            # NOTE: whole prompts without decodes: a bigger step is fewer, bigger matmuls and nothing waits
            # behind it for a token, so pooling takes as many texts per step as this allows.
            budget = max(budget, POOLING_MAX_NUM_BATCHED_TOKENS)
        if whole_prompts and budget < self.max_model_len:
            logger.info("max_num_batched_tokens raised from %d to max_model_len %d: prompts of this pooling model "
                        "run whole", budget, self.max_model_len)
            budget = self.max_model_len
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, budget, self.max_model_len,
                                   chunked_prefill=not whole_prompts)
        # generation_config.json may list more end ids than config.json (Llama 3's <|eot_id|>).
        self.eos_token_ids = frozenset((*self.model_config.eos_token_ids, *token_ids(self.tokenizer.eos_token_id),
                                        *token_ids(self.generation_config.get("eos_token_id"))))
        self._requests: dict[str, _Request] = {}
        self.grammar_matchers = GrammarMatchers()
        self._failures: dict[str, Exception] = {}   # requests that failed in a step, until taken
        # pipeline parallel: started batches, oldest first
        self._in_flight: deque[tuple[SchedulerOutput, PendingOutput]] = deque()
        self.num_overlapped_steps = 0    # steps started while an earlier one was still in flight
        self.num_prompt_tokens_computed = 0
        self.num_generation_tokens_total = 0
        self.load_seconds = time.perf_counter() - start
        logger.info(
            "Loaded %s (%s, %.1fM parameters, %.0f MiB) on %s as %s in %.1fs; KV cache: %d blocks x %d tokens = "
            "%d tokens, %.0f MiB; max_model_len %d", config.model, self.model_config.architecture,
            self.runner.num_parameters / 1e6, self.runner.num_parameter_bytes / 2**20,
            self.platform.describe(), str(self.platform.dtype).removeprefix("torch."), self.load_seconds, num_blocks,
            config.block_size, num_blocks * config.block_size,
            num_blocks * self.runner.kv_bytes_per_block(config.block_size) / 2**20, self.max_model_len)

    # ---- requests -------------------------------------------------------------------------------

    def add_request(self, request: EngineRequest) -> None:
        """Queue a request the InputProcessor checked. Raises ValueError (nothing queued) if its id is in use."""
        request_id, params, prompt_token_ids = request.request_id, request.params, request.prompt_token_ids
        if request_id in self._requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        if request.pooling is not None:
            self._add_pooling_request(request, request.pooling)
            return
        adapter = self._adapter(request.lora_name)
        backend = self.tokenizer.backend_tokenizer
        seqs, detokenizers = [], []
        for index in range(params.n):
            seq_params = params if index == 0 or params.seed is None else params.replace(seed=params.seed + index)
            seqs.append(Sequence(request_id, prompt_token_ids, seq_params, request.max_tokens, self.eos_token_ids,
                                 index=index, arrival_time=request.arrival_time,
                                 lora_slot=adapter.slot if adapter else 0,
                                 lora_key=adapter.cache_key if adapter else 0))
            detokenizers.append(IncrementalDetokenizer(backend, prompt_token_ids, seq_params))
        seqs[0].pending_forks = seqs[1:]
        if request.grammar is not None:
            for seq in seqs:
                self.grammar_matchers.add(seq.seq_id, request.grammar, request.grammar_starts_after)
        prompt_logprobs: list[PositionLogprobs | None] | None = [None] if params.prompt_logprobs is not None else None
        self._requests[request_id] = _Request(request_id, request.prompt, prompt_token_ids, params, seqs,
                                              detokenizers, RequestMetrics(request.arrival_time), prompt_logprobs,
                                              [0] * params.n)
        self.scheduler.add(seqs[0])

    def _add_pooling_request(self, request: EngineRequest, pooling: PoolingParams) -> None:
        """One sequence that runs its prompt and ends; no detokenizer, nothing sampled."""
        adapter = self._adapter(request.lora_name)
        seq = Sequence(request.request_id, request.prompt_token_ids, request.params, request.max_tokens,
                       arrival_time=request.arrival_time, is_pooling=True, lora_slot=adapter.slot if adapter else 0,
                       lora_key=adapter.cache_key if adapter else 0)
        self._requests[request.request_id] = _Request(
            request.request_id, request.prompt, request.prompt_token_ids, request.params, [seq], [],
            RequestMetrics(request.arrival_time), None, [0], pooling)
        self.scheduler.add(seq)

    # ---- LoRA adapters --------------------------------------------------------------------------

    def add_lora(self, name: str, path: str) -> LoadedAdapter:
        """Load a PEFT adapter folder under `name`; raises LoRAError (nothing loaded) if it cannot be."""
        if self.lora is None:
            raise LoRAError("LoRA adapters need --enable-lora")
        return self.lora.add(name, path)

    def remove_lora(self, name: str) -> None:
        """Unload an adapter; refused while requests still use it."""
        if self.lora is None:
            raise LoRAError("LoRA adapters need --enable-lora")
        adapter = self.lora.get(name)
        if any(seq.lora_slot == adapter.slot for request in self._requests.values() for seq in request.seqs):
            raise LoRAError(f"the lora adapter '{name}' is serving requests; unload it when they finish")
        self.lora.remove(name)

    def list_loras(self) -> list[LoadedAdapter]:
        return list(self.lora.adapters.values()) if self.lora is not None else []

    def _adapter(self, name: str | None) -> LoadedAdapter | None:
        if name is None:
            return None
        if self.lora is None:
            raise LoRAError("LoRA adapters need --enable-lora")
        return self.lora.get(name)

    def abort_request(self, request_ids: str | Iterable[str]) -> None:
        """Stop requests now; their KV blocks return to the pool at once."""
        for request_id in [request_ids] if isinstance(request_ids, str) else request_ids:
            request = self._requests.pop(request_id, None)
            if request is None:
                continue
            for seq in request.seqs:
                self.scheduler.finish(seq, SequenceStatus.FINISHED_ABORTED)

    def take_failures(self) -> dict[str, Exception]:
        """Requests that failed while their outputs were made (request id -> error), since the last call.

        NOTE: such a failure (a detokenizer or logprobs error: one request's data) aborts only that
        request; the step's other outputs are returned as usual.
        """
        failures, self._failures = self._failures, {}
        return failures

    def requests_waiting_longer_than(self, seconds: float, now: float) -> list[str]:
        """Requests never scheduled that arrived more than `seconds` before `now` (Unix time)."""
        return [request_id for request_id, request in self._requests.items()
                if request.metrics.first_scheduled_time is None and now - request.metrics.arrival_time > seconds]

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests) or bool(self._in_flight)

    @property
    def num_requests(self) -> int:
        return len(self._requests)

    def stats(self) -> EngineStats:
        return EngineStats(
            num_running=len(self.scheduler.running), num_waiting=len(self.scheduler.waiting),
            kv_cache_usage=self.block_manager.usage, num_prompt_tokens=self.num_prompt_tokens_computed,
            num_generation_tokens=self.num_generation_tokens_total,
            num_prefix_cache_queries=self.block_manager.num_prefix_queries,
            num_prefix_cache_hits=self.block_manager.num_prefix_hits,
            num_preemptions=self.scheduler.num_preemptions, num_free_blocks=self.block_manager.num_free_blocks,
            num_blocks=self.block_manager.num_blocks)

    def model_limits(self) -> ModelLimits:
        """What the InputProcessor checks requests against."""
        return ModelLimits(self.model_config.vocab_size, self.max_model_len, self.config.max_num_seqs,
                           self.eos_token_ids, self.pooler_config, self.model_config.hidden_size)

    def model_info(self) -> ModelInfo:
        runner = self.runner
        return ModelInfo(
            model=self.config.model, architecture=self.model_config.architecture, max_model_len=self.max_model_len,
            vocab_size=self.model_config.vocab_size, device=str(self.platform.device),
            dtype=str(self.platform.dtype).removeprefix("torch."), num_parameters=runner.num_parameters,
            weight_bytes=runner.num_parameter_bytes,
            kv_cache_bytes=self.block_manager.num_blocks * runner.kv_bytes_per_block(self.config.block_size))

    def shutdown(self) -> None:
        """Stop the worker ranks, if any (a single-rank engine has none)."""
        self.executor.shutdown()

    # ---- one step -------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        if self.executor.max_concurrent_batches > 1:
            return self._pipelined_step()
        scheduler_output = self.scheduler.schedule()
        self.grammar_matchers.remove(scheduler_output.finished_seq_ids)
        if scheduler_output.is_empty:
            return []
        rows, pooling_of = self._start_step(scheduler_output)
        if pooling_of:   # an embedding step: pooling models run on one rank
            runner_output = self.runner.execute(scheduler_output, rows, pooling_of)
        else:
            runner_output = self.executor.execute_model(scheduler_output, rows)
        appended = self.scheduler.update(scheduler_output, runner_output.sampled_token_ids)
        return self._process_outputs(scheduler_output, runner_output, appended)

    def _pipelined_step(self) -> list[RequestOutput]:
        """Pipeline parallel: start batches (of sequences not already in flight) until every stage has one,
        then finish the oldest. While the later stages run a batch, the first one runs the next."""
        while len(self._in_flight) < self.executor.max_concurrent_batches:
            in_flight = frozenset(item.seq.seq_id for output, _ in self._in_flight for item in output.scheduled)
            scheduler_output = self.scheduler.schedule(in_flight)
            if scheduler_output.is_empty:
                break
            rows, _ = self._start_step(scheduler_output)   # (pooling models are never pipelined)
            self.num_overlapped_steps += bool(self._in_flight)
            self._in_flight.append((scheduler_output, self.executor.start_step(scheduler_output, rows)))
        if not self._in_flight:
            return []
        scheduler_output, pending = self._in_flight.popleft()
        runner_output = pending.result()
        appended = self.scheduler.update(scheduler_output, runner_output.sampled_token_ids)
        return self._process_outputs(scheduler_output, runner_output, appended)

    def _start_step(self, scheduler_output: SchedulerOutput
                    ) -> tuple[dict[int, SamplingRow], dict[int, PoolingParams]]:
        """Per-step bookkeeping as a step starts; the sampling state of each sequence it samples, and the
        pooling params of each it pools."""
        now = time.time()
        rows = {}
        pooling_of: dict[int, PoolingParams] = {}
        for item in scheduler_output.scheduled:
            request = self._requests[item.seq.request_id]
            if request.metrics.first_scheduled_time is None:
                request.metrics.first_scheduled_time = now
            if item.start < item.seq.num_prompt_tokens:
                self.num_prompt_tokens_computed += min(item.num_new_tokens, item.seq.num_prompt_tokens - item.start)
            if item.is_sampling and request.pooling is not None:
                pooling_of[item.seq.seq_id] = request.pooling
            elif item.is_sampling:
                seq = item.seq
                rows[seq.seq_id] = SamplingRow(seq.seq_id, seq.params, seq.token_ids, seq.num_prompt_tokens,
                                               seq.eos_token_ids, self.grammar_matchers.matcher_for(seq))
        return rows, pooling_of

    def _process_outputs(self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput,
                         appended: list[Sequence]) -> list[RequestOutput]:
        now = time.time()
        touched: dict[str, _Request] = {}
        scheduled = {item.seq.seq_id: item for item in scheduler_output.scheduled}
        for seq_id, chunk_logprobs in runner_output.prompt_logprobs.items():
            item = scheduled[seq_id]
            request = self._requests.get(item.seq.request_id)
            if request is None:   # aborted while its step was in flight (pipeline parallel)
                continue
            assert request.prompt_logprobs is not None, "prompt logprobs of a request that asked for none"
            # NOTE: a preempted sequence recomputes its prompt; positions already reported are not repeated.
            num_known = len(request.prompt_logprobs) - (item.start + 1)
            try:
                request.prompt_logprobs.extend(self._to_position_logprobs(lp)
                                               for lp in chunk_logprobs[max(num_known, 0):])
            except Exception as error:   # noqa: BLE001 - fails this request only (take_failures)
                self._fail(request, error)
        for seq in appended:
            if seq.request_id not in self._requests:   # failed earlier in this step
                continue
            request = self._requests[seq.request_id]
            self.num_generation_tokens_total += 1
            try:
                self._add_token(request, seq, runner_output, now)
            except Exception as error:   # noqa: BLE001 - fails this request only (take_failures)
                self._fail(request, error)
                continue
            touched[request.request_id] = request
        outputs = [self._pooled_output(scheduled[seq_id].seq, embedding, now)
                   for seq_id, embedding in runner_output.embeddings.items()]
        for request in touched.values():
            if request.request_id not in self._requests:
                continue
            try:
                output = self._make_output(request)
            except Exception as error:   # noqa: BLE001 - fails this request only (take_failures)
                self._fail(request, error)
                continue
            if output is not None:
                outputs.append(output)
            if request.is_finished:
                request.metrics.finished_time = now
                del self._requests[request.request_id]
        return outputs

    def _pooled_output(self, seq: Sequence, embedding: list[float], now: float) -> RequestOutput:
        request = self._requests.pop(seq.request_id)
        request.metrics.first_token_time = request.metrics.last_token_time = request.metrics.finished_time = now
        return RequestOutput(request_id=request.request_id, prompt=request.prompt,
                             prompt_token_ids=request.prompt_token_ids, outputs=[], finished=True,
                             num_cached_tokens=seq.num_cached_tokens, metrics=request.metrics, embedding=embedding)
    def _fail(self, request: _Request, error: Exception) -> None:
        self._failures[request.request_id] = error
        self.abort_request(request.request_id)

    def _add_token(self, request: _Request, seq: Sequence, runner_output: ModelRunnerOutput, now: float) -> None:
        """The sequence's newest token into the request's metrics, logprobs and text (stop strings)."""
        metrics = request.metrics
        if metrics.first_token_time is None or metrics.last_token_time is None:
            metrics.first_token_time = now
        elif now != metrics.last_token_time:   # the n sequences of a request step together: one gap
            metrics.token_gaps.append(now - metrics.last_token_time)
        metrics.last_token_time = now
        self.grammar_matchers.accept(seq)
        token_logprobs = runner_output.logprobs.get(seq.seq_id)
        if token_logprobs is not None:
            seq.cumulative_logprob += token_logprobs.logprob
            seq.output_logprobs.append(self._to_position_logprobs(token_logprobs))
        stop = request.detokenizers[seq.index].add_token(seq.token_ids[-1])
        if stop is not None and not seq.is_finished:
            self.scheduler.finish(seq, SequenceStatus.FINISHED_STOPPED, stop)
        elif not seq.is_finished and self.grammar_matchers.is_terminated(seq):
            # The grammar took its end token: the answer is complete, even under min_tokens or ignore_eos.
            self.scheduler.finish(seq, SequenceStatus.FINISHED_STOPPED)

    def _make_output(self, request: _Request) -> RequestOutput | None:
        finished = request.is_finished
        kind = request.params.output_kind
        if kind is OutputKind.FINAL_ONLY and not finished:
            return None
        delta = kind is OutputKind.DELTA
        completions = []
        for seq, detokenizer in zip(request.seqs, request.detokenizers):
            new_text = detokenizer.take_new_text(seq.is_finished)
            sent = request.num_sent_tokens[seq.index] if delta else 0
            request.num_sent_tokens[seq.index] = seq.num_output_tokens
            output_ids = seq.token_ids[seq.num_prompt_tokens + sent:]
            logprobs = seq.output_logprobs[sent:] if seq.params.logprobs is not None else None
            text = new_text if delta else detokenizer.emitted_text
            completions.append(CompletionOutput(
                index=seq.index, text=text, token_ids=output_ids,
                cumulative_logprob=seq.cumulative_logprob if seq.params.logprobs is not None else None,
                logprobs=logprobs, finish_reason=seq.finish_reason, stop_reason=seq.stop_reason,
                num_output_tokens=seq.num_output_tokens))
        first = request.seqs[0]
        return RequestOutput(
            request_id=request.request_id, prompt=request.prompt, prompt_token_ids=request.prompt_token_ids,
            outputs=completions, finished=finished, prompt_logprobs=request.prompt_logprobs,
            num_cached_tokens=first.num_cached_tokens, metrics=request.metrics)

    def _to_position_logprobs(self, logprobs: TokenLogprobs) -> PositionLogprobs:
        """The chosen token first, then the top alternatives, each with its decoded text."""
        entries: PositionLogprobs = {
            logprobs.token_id: Logprob(logprobs.logprob, logprobs.rank, self._decode_one(logprobs.token_id))}
        for rank, (top_id, value) in enumerate(zip(logprobs.top_token_ids, logprobs.top_logprobs), start=1):
            if top_id not in entries:
                entries[top_id] = Logprob(value, rank, self._decode_one(top_id))
        return entries

    def _decode_one(self, token_id: int) -> str:
        return str(self.tokenizer.decode([token_id]))

    # ---- sizing ---------------------------------------------------------------------------------

    def _resolve_max_model_len(self) -> int:
        # RoBERTa's positions start at padding_idx + 1: that many fewer tokens fit its position table
        model_max = self.model_config.max_position_embeddings - self.model_config.position_offset
        if self.pooler_config is not None and self.pooler_config.max_seq_length:
            # sentence_bert_config.json: the longest input the embedding model was trained on, as vLLM reads it
            model_max = min(model_max, self.pooler_config.max_seq_length)
        asked = self.config.max_model_len
        if asked is None:
            return model_max
        if asked > model_max:
            logger.warning("max_model_len %d exceeds what %s was trained for (%d); using %d",
                           asked, self.config.model, model_max, model_max)
            return model_max
        return asked

    def _resolve_num_blocks(self) -> int:
        block_size = self.config.block_size
        most_useful = -(-self.max_model_len // block_size) * self.config.max_num_seqs
        if self.config.num_kv_blocks is not None:
            num_blocks = self.config.num_kv_blocks
        elif self.runner.kv_bytes_per_block(block_size) == 0:
            num_blocks = most_useful   # an encoder: blocks only count tokens in flight, nothing is cached
        else:
            # NOTE: per rank, as vLLM's CPU backend sizes it: each rank holds its layers' share of the heads.
            num_blocks = self.platform.kv_cache_bytes(self.config) // self.executor.kv_bytes_per_block(block_size)
            # No use holding more than every sequence at full length could fill.
            num_blocks = min(num_blocks, most_useful)
        if num_blocks * block_size < self.max_model_len:
            capacity = num_blocks * block_size
            if capacity < block_size:
                raise ValueError("the KV cache budget is too small for a single block; raise --kv-cache-space")
            logger.warning("the KV cache holds %d tokens, less than max_model_len %d; lowering max_model_len to %d",
                           capacity, self.max_model_len, capacity)
            self.max_model_len = capacity
        return num_blocks
