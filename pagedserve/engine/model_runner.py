"""Owns the model and its KV cache: builds and loads the model, sizes the cache, turns a scheduler
output into input tensors, runs the forward pass and samples."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterable

import torch
from torch import nn

from pagedserve.config import ModelConfig
from pagedserve.config.pooler import PoolerConfig
from pagedserve.distributed import ModelParallel, model_parallel
from pagedserve.engine.pooler import Pooler, PoolingRow
from pagedserve.engine.platform import Platform
from pagedserve.models.parallel import check_parallel_fits
from pagedserve.engine.scheduler import ScheduledSequence, SchedulerOutput
from pagedserve.layers.attention import Attention
from pagedserve.layers.forward_context import AttentionMetadata, ForwardContext, PrefillChunk, forward_context
from pagedserve.layers.linear import PackableWeight
from pagedserve.layers.lora import LoRABatch
from pagedserve.layers.mla_attention import MLAAttention
from pagedserve.layers.quant import PackedWeight
from pagedserve.layers.sampler import Sampler, SamplingRow, TokenLogprobs, token_logprobs
from pagedserve.models.causal_lm import CausalLM
from pagedserve.models.loading import load_weights
from pagedserve.models.registry import model_class
from pagedserve.pooling_params import PoolingParams

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelRunnerOutput:
    sampled_token_ids: dict[int, int]                       # seq_id -> token
    logprobs: dict[int, TokenLogprobs]                      # seq_id -> the sampled token's logprobs
    prompt_logprobs: dict[int, list[TokenLogprobs]]         # seq_id -> this chunk's prompt positions
    embeddings: dict[int, list[float]] = field(default_factory=dict)   # seq_id -> pooled prompt


@dataclass(frozen=True)
class ChunkPlan:
    """One scheduled sequence as every rank needs it: plain data, no Sequence object."""

    seq_id: int
    start: int                       # tokens already in the cache
    token_ids: tuple[int, ...]       # the tokens this step computes
    block_ids: tuple[int, ...]       # the sequence's block table
    is_sampling: bool
    num_prompt_logprob_rows: int     # rows whose logits give prompt logprobs (0: none asked)
    lora_slot: int = 0               # the LoRA adapter's slot serving it, 0 = the base model


@dataclass(frozen=True)
class StepPlan:
    """A scheduler output as the ranks run it, decodes first; what the driver sends every worker each step
    (small and picklable: only this step's tokens and the block tables)."""

    chunks: tuple[ChunkPlan, ...]
    finished_seq_ids: tuple[int, ...]

    @property
    def num_tokens(self) -> int:
        return sum(len(chunk.token_ids) for chunk in self.chunks)

    def logit_rows(self) -> list[int]:
        """Rows of the step whose logits are needed: the sampled rows, then each chunk's prompt-logprob rows."""
        sample_rows: list[int] = []
        prompt_rows: list[int] = []
        row = 0
        for chunk in self.chunks:
            if chunk.is_sampling:
                sample_rows.append(row + len(chunk.token_ids) - 1)
            prompt_rows.extend(range(row, row + chunk.num_prompt_logprob_rows))
            row += len(chunk.token_ids)
        return sample_rows + prompt_rows


def plan_step(scheduler_output: SchedulerOutput) -> StepPlan:
    # Decodes (one query token) first so they can be attended in one batched call.
    items = sorted(scheduler_output.scheduled, key=lambda item: item.num_new_tokens > 1)
    chunks = []
    for item in items:
        seq = item.seq
        num_prompt_rows = 0
        if seq.params.prompt_logprobs is not None and not seq.is_prefill_done:
            num_prompt_rows = max(0, min(item.start + item.num_new_tokens, seq.num_prompt_tokens - 1) - item.start)
        chunks.append(ChunkPlan(seq.seq_id, item.start, tuple(seq.token_ids[item.start:item.start + item.num_new_tokens]),
                                tuple(seq.block_ids), item.is_sampling, num_prompt_rows, seq.lora_slot))
    return StepPlan(tuple(chunks), scheduler_output.finished_seq_ids)


@dataclass(frozen=True)
class StartedStep:
    """A batch the first pipeline stage has run and sent on, awaiting the last stage's hidden states."""

    plan: StepPlan
    metadata: AttentionMetadata
    sent: torch.Tensor               # kept alive until the send completes
    send: Any                        # its torch.distributed Work


@dataclass(frozen=True)
class _StepInputs:
    input_ids: torch.Tensor          # [num_tokens]
    positions: torch.Tensor          # [num_tokens]
    metadata: AttentionMetadata


class ModelRunner:
    """One rank's shard of the model (all of it on a single rank). The driver (rank 0) also samples."""

    def __init__(self, model_config: ModelConfig, platform: Platform,
                 weights: Iterable[tuple[str, torch.Tensor | PackedWeight]],
                 seed: int = 0, parallel: ModelParallel = ModelParallel(),
                 pooler_config: PoolerConfig | None = None) -> None:
        self.model_config = model_config
        self.device = platform.device
        self.dtype = platform.dtype
        self.parallel = parallel
        # NOTE: this model's choice alone, handed to its layers in each step's ForwardContext; another
        # engine in the same process may choose differently.
        self.use_cpu_kernels = platform.use_cpu_kernels
        self.model = _build_model(model_config, platform, weights, parallel)
        # None for an encoder, which has no output head and is only pooled.
        self.lm = self.model if isinstance(self.model, CausalLM) else None
        if self.lm is not None and platform.use_cpu_kernels:
            self.lm.enable_fused_decode()
        self.pooler = Pooler(pooler_config) if pooler_config is not None else None
        self.sampler = Sampler(self.device, seed)
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, (Attention, MLAAttention))]
        self.block_size = 0
        self.num_blocks = 0

    @property
    def num_parameter_bytes(self) -> int:
        """Bytes of all weights as held in memory (packed ones at their packed size)."""
        total = sum(p.numel() * p.element_size() for p in self.model.parameters())
        for module in self.model.modules():
            packed = getattr(module, "packed", None)
            if packed is not None:
                tensors = (packed.codes, packed.scales) + ((packed.offsets,) if packed.offsets is not None else ())
                total += sum(t.numel() * t.element_size() for t in tensors)
        return total

    @property
    def num_parameters(self) -> int:
        """Weights counted by their logical shape, packed or not (a 4-bit code is one parameter, not half)."""
        total = sum(p.numel() for p in self.model.parameters())
        return total + sum(m.packed.shape.numel() for m in self.model.modules()
                           if isinstance(m, PackableWeight) and m.packed is not None)

    def kv_bytes_per_block(self, block_size: int) -> int:
        """Bytes of one block of this rank's KV cache: its layers, its key/value heads (0 for an encoder:
        its attention reads only the step's own K/V and caches nothing)."""
        element_size = torch.empty((), dtype=self.dtype).element_size()
        per_token = sum(layer.config.cache_width if isinstance(layer, MLAAttention) else
                        2 * layer.num_kv_heads * layer.head_dim for layer in self.attention_layers)
        return per_token * element_size * block_size

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        # NOTE: each layer shapes its own blocks: K and V per head, or one latent per token (MLA).
        for layer in self.attention_layers:
            layer.allocate_cache(num_blocks, block_size, self.dtype, self.device)

    def _head(self) -> CausalLM:
        assert self.lm is not None, "an encoder has no output head"
        return self.lm

    def execute(self, scheduler_output: SchedulerOutput, rows_of: dict[int, SamplingRow],
                pooling_of: dict[int, PoolingParams] | None = None) -> ModelRunnerOutput:
        """Run one step on a single rank. `rows_of` gives the sampling state of every scheduled sequence
        that samples, `pooling_of` the pooling params of every pooled sequence whose prompt ends in this step."""
        plan = plan_step(scheduler_output)
        if pooling_of:
            return self.pool(plan, pooling_of)
        return self.execute_plan(plan, scheduler_output, rows_of)

    @torch.inference_mode()
    def pool(self, plan: StepPlan, pooling_of: dict[int, PoolingParams]) -> ModelRunnerOutput:
        """An embedding step (one rank: pooling models are not split): the forward pass, then each
        finished prompt's hidden states pooled."""
        assert self.pooler is not None, "pooling requests reached a model without a pooler"
        self.sampler.forget(plan.finished_seq_ids)
        inputs = self._prepare_inputs(plan)
        with forward_context(ForwardContext(inputs.metadata, self.use_cpu_kernels, _lora_batch(plan, self.device))):
            hidden_states = self.model(inputs.input_ids, inputs.positions)   # [num_tokens, hidden_size]
        rows, query_start = [], 0
        for chunk in plan.chunks:
            if chunk.seq_id in pooling_of:
                rows.append(PoolingRow(chunk.seq_id, query_start, len(chunk.token_ids), chunk.start == 0,
                                       pooling_of[chunk.seq_id]))
            query_start += len(chunk.token_ids)
        return ModelRunnerOutput({}, {}, {}, self.pooler(hidden_states, rows))

    def execute_plan(self, plan: StepPlan, scheduler_output: SchedulerOutput,
                     rows_of: dict[int, SamplingRow]) -> ModelRunnerOutput:
        """The driver's step: this rank's shard of the forward pass, then sampling."""
        return self.sample(plan, scheduler_output, self.run(plan), rows_of)

    def sample(self, plan: StepPlan, scheduler_output: SchedulerOutput, logits: torch.Tensor | None,
               rows_of: dict[int, SamplingRow]) -> ModelRunnerOutput:
        self.sampler.forget(plan.finished_seq_ids)
        return self._outputs(plan, scheduler_output, logits, rows_of)

    @torch.inference_mode()
    def start(self, plan: StepPlan) -> StartedStep:
        """First pipeline stage: run its layers and hand the result on without waiting, so the next batch
        can start here while later stages work on this one."""
        inputs = self._prepare_inputs(plan)
        with forward_context(ForwardContext(inputs.metadata, self.use_cpu_kernels, _lora_batch(plan, self.device))):
            hidden_states = self.model(inputs.input_ids, inputs.positions)   # [2, num_tokens, hidden_size]
        return StartedStep(plan, inputs.metadata, hidden_states, self.parallel.isend_to_next(hidden_states))

    @torch.inference_mode()
    def finish(self, started: StartedStep) -> torch.Tensor | None:
        """First pipeline stage: the final hidden states back from the last stage, then the logits."""
        plan = started.plan
        hidden_states = self.parallel.recv_from_previous((plan.num_tokens, self.model_config.hidden_size),
                                                         self.dtype)
        started.send.wait()
        rows = plan.logit_rows()
        with forward_context(ForwardContext(started.metadata, self.use_cpu_kernels)):
            return self._head().compute_logits(hidden_states[rows]) if rows else None

    @torch.inference_mode()
    def run(self, plan: StepPlan) -> torch.Tensor | None:
        """This rank's part of a step: its layers, the hand-over between pipeline stages, and on the first
        stage the logits of `plan.logit_rows()` (None elsewhere, or when no row needs them)."""
        stage, hidden_size = self.parallel.stage, self.model_config.hidden_size
        if stage.size > 1 and stage.is_first:
            return self.finish(self.start(plan))
        inputs = self._prepare_inputs(plan)
        received = None
        if not stage.is_first:
            received = self.parallel.recv_from_previous((2, plan.num_tokens, hidden_size), self.dtype)
        # NOTE: the context spans the logits too: the output head is one of this model's (packed) layers.
        with forward_context(ForwardContext(inputs.metadata, self.use_cpu_kernels, _lora_batch(plan, self.device),
                                            pipeline_inputs=received)):
            hidden_states = self.model(inputs.input_ids, inputs.positions)   # [num_tokens, hidden_size]
            if stage.size > 1:
                # the last stage hands its final hidden states back to the first, which holds the output head
                self.parallel.send_to_next(hidden_states)
                return None
            rows = plan.logit_rows()
            return self._head().compute_logits(hidden_states[rows]) if rows else None   # [num_rows, vocab_size]

    def _outputs(self, plan: StepPlan, scheduler_output: SchedulerOutput, logits: torch.Tensor | None,
                 rows_of: dict[int, SamplingRow]) -> ModelRunnerOutput:
        """Prompt logprobs of the prefill chunks that asked for them, and a token for every sampling row."""
        items = {item.seq.seq_id: item for item in scheduler_output.scheduled}
        sample_seq_ids = [chunk.seq_id for chunk in plan.chunks if chunk.is_sampling]
        prompt_logprobs: dict[int, list[TokenLogprobs]] = {}
        row = len(sample_seq_ids)
        for chunk in plan.chunks:
            seq = items[chunk.seq_id].seq
            if seq.params.prompt_logprobs is not None and not seq.is_prefill_done:
                num_rows = chunk.num_prompt_logprob_rows
                chunk_logits = logits[row:row + num_rows] if logits is not None and num_rows else None
                prompt_logprobs[chunk.seq_id] = self._prompt_logprobs(chunk_logits, items[chunk.seq_id])
                row += num_rows
        if not sample_seq_ids:
            return ModelRunnerOutput({}, {}, prompt_logprobs)
        assert logits is not None, "the driver computes the logits of every sampled row"
        rows = [rows_of[seq_id] for seq_id in sample_seq_ids]
        sampled = self.sampler(logits[:len(sample_seq_ids)], rows)
        logprobs = {s: lp for s, lp in zip(sample_seq_ids, sampled.logprobs) if lp is not None}
        return ModelRunnerOutput(dict(zip(sample_seq_ids, sampled.token_ids)), logprobs, prompt_logprobs)

    def _prompt_logprobs(self, logits: torch.Tensor | None, item: ScheduledSequence) -> list[TokenLogprobs]:
        """Logprobs of the prompt tokens this chunk predicts (each row predicts the next token)."""
        if logits is None or not len(logits):
            return []
        seq = item.seq
        logprobs = torch.log_softmax(logits, dim=-1)
        targets = seq.token_ids[item.start + 1:item.start + 1 + len(logits)]
        num_top = seq.params.prompt_logprobs or 0
        return [token_logprobs(logprobs[i], targets[i], num_top) for i in range(len(logits))]

    def _prepare_inputs(self, plan: StepPlan) -> _StepInputs:
        chunks = plan.chunks
        num_decodes = sum(1 for chunk in chunks if len(chunk.token_ids) == 1)
        input_ids: list[int] = []
        positions: list[int] = []
        query_starts: list[int] = []
        for chunk in chunks:
            query_starts.append(len(input_ids))
            input_ids.extend(chunk.token_ids)
            positions.extend(range(chunk.start, chunk.start + len(chunk.token_ids)))
        positions_t = torch.tensor(positions, dtype=torch.long)
        block_tables = _pad_block_tables([list(chunk.block_ids) for chunk in chunks])   # [num_chunks, max_blocks]
        item_of_token = torch.repeat_interleave(torch.arange(len(chunks)),
                                                torch.tensor([len(chunk.token_ids) for chunk in chunks]))
        block_of_token = block_tables[item_of_token, positions_t // self.block_size]
        slot_mapping = block_of_token * self.block_size + positions_t % self.block_size
        decode_chunks = chunks[:num_decodes]
        context_lens = torch.tensor([chunk.start + 1 for chunk in decode_chunks], dtype=torch.long)
        decode_tables = _pad_block_tables([list(chunk.block_ids[:-(-(chunk.start + 1) // self.block_size)])
                                           for chunk in decode_chunks])
        prefills = [
            PrefillChunk(query_start=query_starts[i], num_query_tokens=len(chunk.token_ids), start=chunk.start,
                         block_ids=torch.tensor(chunk.block_ids, dtype=torch.long, device=self.device))
            for i, chunk in enumerate(chunks) if i >= num_decodes
        ]
        metadata = AttentionMetadata(
            slot_mapping=slot_mapping.to(self.device),
            num_decodes=num_decodes,
            decode_block_tables=decode_tables.to(self.device),
            decode_context_lens=context_lens.to(self.device),
            prefills=prefills,
        )
        return _StepInputs(torch.tensor(input_ids, dtype=torch.long, device=self.device),
                           positions_t.to(self.device), metadata)


def _lora_batch(plan: StepPlan, device: torch.device) -> LoRABatch | None:
    """The token rows of each adapter this step, or None when every row runs the base model."""
    rows_of: dict[int, list[int]] = {}
    query_start = 0
    for chunk in plan.chunks:
        if chunk.lora_slot:
            rows_of.setdefault(chunk.lora_slot, []).extend(range(query_start, query_start + len(chunk.token_ids)))
        query_start += len(chunk.token_ids)
    if not rows_of:
        return None
    return LoRABatch(tuple((slot, torch.tensor(rows, dtype=torch.long, device=device))
                           for slot, rows in sorted(rows_of.items())))


def _pad_block_tables(tables: list[list[int]]) -> torch.Tensor:
    """[num_tables, longest] with short tables padded by block 0 (masked out by context lengths)."""
    width = max((len(t) for t in tables), default=0)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long).view(len(tables), width)


def _build_model(config: ModelConfig, platform: Platform, weights: Iterable[tuple[str, torch.Tensor | PackedWeight]],
                 parallel: ModelParallel) -> nn.Module:
    cls = model_class(config)
    check_parallel_fits(config, parallel.tp.size, parallel.stage.size)
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(platform.dtype)
    try:
        with torch.device(platform.device), model_parallel(parallel):
            model = cls(config)
    finally:
        torch.set_default_dtype(previous_dtype)
    load_weights(model, weights)
    for module in model.modules():
        if isinstance(module, PackableWeight):
            module.drop_unused_float_weight()
    model.eval()
    return model
