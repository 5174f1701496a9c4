"""Owns the model and its KV cache: builds and loads the model, sizes the cache, turns a scheduler
output into input tensors, runs the forward pass and samples."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable

import torch

from pagedserve.config import ModelConfig
from pagedserve.engine.platform import Platform
from pagedserve.engine.scheduler import ScheduledSequence, SchedulerOutput
from pagedserve.layers.attention import Attention
from pagedserve.layers.forward_context import AttentionMetadata, ForwardContext, PrefillChunk, forward_context
from pagedserve.layers.linear import PackableWeight
from pagedserve.layers.lora import LoRABatch
from pagedserve.layers.quant import PackedWeight
from pagedserve.layers.sampler import Sampler, SamplingRow, TokenLogprobs, token_logprobs
from pagedserve.models.causal_lm import CausalLM
from pagedserve.models.loading import load_weights
from pagedserve.models.registry import model_class

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelRunnerOutput:
    sampled_token_ids: dict[int, int]                       # seq_id -> token
    logprobs: dict[int, TokenLogprobs]                      # seq_id -> the sampled token's logprobs
    prompt_logprobs: dict[int, list[TokenLogprobs]]         # seq_id -> this chunk's prompt positions


@dataclass(frozen=True)
class _StepInputs:
    input_ids: torch.Tensor          # [num_tokens]
    positions: torch.Tensor          # [num_tokens]
    metadata: AttentionMetadata
    items: list[ScheduledSequence]   # in batch order: decodes first
    query_starts: list[int]          # first row of each item


class ModelRunner:
    def __init__(self, model_config: ModelConfig, platform: Platform,
                 weights: Iterable[tuple[str, torch.Tensor | PackedWeight]],
                 seed: int = 0) -> None:
        self.model_config = model_config
        self.device = platform.device
        self.dtype = platform.dtype
        # NOTE: this model's choice alone, handed to its layers in each step's ForwardContext; another
        # engine in the same process may choose differently.
        self.use_cpu_kernels = platform.use_cpu_kernels
        self.model = _build_model(model_config, platform, weights)
        if platform.use_cpu_kernels:
            self.model.enable_fused_decode()
        self.sampler = Sampler(self.device, seed)
        self.attention_layers = [m for m in self.model.modules() if isinstance(m, Attention)]
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
        element_size = torch.empty((), dtype=self.dtype).element_size()
        return self.model_config.kv_bytes_per_token * element_size * block_size

    def allocate_kv_cache(self, num_blocks: int, block_size: int) -> None:
        self.num_blocks, self.block_size = num_blocks, block_size
        shape = (num_blocks, block_size, self.model_config.num_key_value_heads, self.model_config.head_dim)
        for layer in self.attention_layers:
            layer.k_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)
            layer.v_cache = torch.zeros(shape, dtype=self.dtype, device=self.device)

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput, rows_of: dict[int, SamplingRow]) -> ModelRunnerOutput:
        """Run one step. `rows_of` gives the sampling state of every scheduled sequence that samples."""
        self.sampler.forget(scheduler_output.finished_seq_ids)
        inputs = self._prepare_inputs(scheduler_output)
        # NOTE: the context spans the logits too: the output head is one of this model's (packed) layers.
        with forward_context(ForwardContext(inputs.metadata, self.use_cpu_kernels, _lora_batch(inputs))):
            hidden_states = self.model(inputs.input_ids, inputs.positions)   # [num_tokens, hidden_size]
            return self._outputs(inputs, hidden_states, rows_of)

    def _outputs(self, inputs: _StepInputs, hidden_states: torch.Tensor,
                 rows_of: dict[int, SamplingRow]) -> ModelRunnerOutput:
        """Prompt logprobs of the prefill chunks that asked for them, and a token for every sampling row."""
        sample_rows, sample_items = [], []
        prompt_logprobs: dict[int, list[TokenLogprobs]] = {}
        for item, query_start in zip(inputs.items, inputs.query_starts):
            if item.seq.params.prompt_logprobs is not None and not item.seq.is_prefill_done:
                prompt_logprobs[item.seq.seq_id] = self._prompt_logprobs(hidden_states, item, query_start)
            if item.is_sampling:
                sample_rows.append(query_start + item.num_new_tokens - 1)
                sample_items.append(item)
        if not sample_rows:
            return ModelRunnerOutput({}, {}, prompt_logprobs)
        logits = self.model.compute_logits(hidden_states[sample_rows])     # [num_samples, vocab_size]
        rows = [rows_of[item.seq.seq_id] for item in sample_items]
        sampled = self.sampler(logits, rows)
        seq_ids = [item.seq.seq_id for item in sample_items]
        logprobs = {s: lp for s, lp in zip(seq_ids, sampled.logprobs) if lp is not None}
        return ModelRunnerOutput(dict(zip(seq_ids, sampled.token_ids)), logprobs, prompt_logprobs)

    def _prompt_logprobs(self, hidden_states: torch.Tensor, item: ScheduledSequence,
                         query_start: int) -> list[TokenLogprobs]:
        """Logprobs of the prompt tokens this chunk predicts (each row predicts the next token)."""
        seq = item.seq
        end = min(item.start + item.num_new_tokens, seq.num_prompt_tokens - 1)
        num_rows = end - item.start
        if num_rows <= 0:
            return []
        logits = self.model.compute_logits(hidden_states[query_start:query_start + num_rows])
        logprobs = torch.log_softmax(logits, dim=-1)
        targets = seq.token_ids[item.start + 1:end + 1]
        num_top = seq.params.prompt_logprobs or 0
        return [token_logprobs(logprobs[i], targets[i], num_top) for i in range(num_rows)]

    def _prepare_inputs(self, scheduler_output: SchedulerOutput) -> _StepInputs:
        # Decodes (one query token) first so they can be attended in one batched call.
        items = sorted(scheduler_output.scheduled, key=lambda item: item.num_new_tokens > 1)
        num_decodes = sum(1 for item in items if item.num_new_tokens == 1)
        input_ids: list[int] = []
        positions: list[int] = []
        query_starts: list[int] = []
        for item in items:
            query_starts.append(len(input_ids))
            input_ids.extend(item.seq.token_ids[item.start:item.start + item.num_new_tokens])
            positions.extend(range(item.start, item.start + item.num_new_tokens))
        positions_t = torch.tensor(positions, dtype=torch.long)
        block_tables = _pad_block_tables([item.seq.block_ids for item in items])   # [num_items, max_blocks]
        item_of_token = torch.repeat_interleave(torch.arange(len(items)),
                                                torch.tensor([item.num_new_tokens for item in items]))
        block_of_token = block_tables[item_of_token, positions_t // self.block_size]
        slot_mapping = block_of_token * self.block_size + positions_t % self.block_size
        decode_items = items[:num_decodes]
        context_lens = torch.tensor([item.start + 1 for item in decode_items], dtype=torch.long)
        decode_tables = _pad_block_tables([item.seq.block_ids[:-(-(item.start + 1) // self.block_size)]
                                           for item in decode_items])
        prefills = [
            PrefillChunk(query_start=query_starts[i], num_query_tokens=item.num_new_tokens, start=item.start,
                         block_ids=torch.tensor(item.seq.block_ids, dtype=torch.long, device=self.device))
            for i, item in enumerate(items) if i >= num_decodes
        ]
        metadata = AttentionMetadata(
            slot_mapping=slot_mapping.to(self.device),
            num_decodes=num_decodes,
            decode_block_tables=decode_tables.to(self.device),
            decode_context_lens=context_lens.to(self.device),
            prefills=prefills,
        )
        return _StepInputs(torch.tensor(input_ids, dtype=torch.long, device=self.device),
                           positions_t.to(self.device), metadata, items, query_starts)


def _lora_batch(inputs: _StepInputs) -> LoRABatch | None:
    """The token rows of each adapter this step, or None when every row runs the base model."""
    rows_of: dict[int, list[int]] = {}
    for item, query_start in zip(inputs.items, inputs.query_starts):
        if item.seq.lora_slot:
            rows_of.setdefault(item.seq.lora_slot, []).extend(range(query_start, query_start + item.num_new_tokens))
    if not rows_of:
        return None
    device = inputs.input_ids.device
    return LoRABatch(tuple((slot, torch.tensor(rows, dtype=torch.long, device=device))
                           for slot, rows in sorted(rows_of.items())))


def _pad_block_tables(tables: list[list[int]]) -> torch.Tensor:
    """[num_tables, longest] with short tables padded by block 0 (masked out by context lengths)."""
    width = max((len(t) for t in tables), default=0)
    return torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.long).view(len(tables), width)


def _build_model(config: ModelConfig, platform: Platform, weights: Iterable[tuple[str, torch.Tensor | PackedWeight]]
                 ) -> CausalLM:
    cls = model_class(config)
    previous_dtype = torch.get_default_dtype()
    torch.set_default_dtype(platform.dtype)
    try:
        with torch.device(platform.device):
            model = cls(config)
    finally:
        torch.set_default_dtype(previous_dtype)
    load_weights(model, weights)
    for module in model.modules():
        if isinstance(module, PackableWeight):
            module.drop_unused_float_weight()
    model.eval()
    return model
