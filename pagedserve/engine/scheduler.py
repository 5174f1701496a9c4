"""Who runs in the next step, and how many tokens each computes. No torch here.

Every step has a token budget. Running sequences go first (a decode costs one token, an unfinished
prompt the rest of its chunk), then waiting ones are admitted while budget, sequence slots and KV
blocks last. Prefill and decode share one step, so a long prompt is chunked and never stalls decodes.
When the KV cache is full, the most recently admitted sequence is preempted: its blocks are freed and
it is recomputed later from its tokens (prompt + what it generated), so nothing is lost.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from pagedserve.engine.block_manager import BlockManager
from pagedserve.engine.sequence import Sequence, SequenceStatus


@dataclass(frozen=True)
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int
    start: int                        # the sequence's num_computed_tokens when scheduled

    @property
    def is_sampling(self) -> bool:
        """True when this chunk reaches the sequence's last token, so the step samples its next one."""
        return self.start + self.num_new_tokens == self.seq.num_tokens


@dataclass(frozen=True)
class SchedulerOutput:
    scheduled: tuple[ScheduledSequence, ...]
    num_batched_tokens: int
    # Sequences that finished since the previous step, so the runner can drop their per-sequence state.
    finished_seq_ids: tuple[int, ...] = ()

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int, chunked_prefill: bool = True) -> None:
        self.block_manager = block_manager
        # NOTE: off for prompts that must run whole (an encoder's, or MEAN/CLS pooling): a prompt waits
        # until one step's budget holds all of it. The engine keeps the budget at least max_model_len.
        self.chunked_prefill = chunked_prefill
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self._finished_seq_ids: list[int] = []

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def schedule(self, in_flight: frozenset[int] = frozenset()) -> SchedulerOutput:
        """The next step. `in_flight`: ids of sequences whose previous step is still running (pipeline
        parallel keeps several batches in flight); they are neither scheduled nor preempted now."""
        budget = self.max_num_batched_tokens
        scheduled: list[ScheduledSequence] = []
        num_preempted_before = self.num_preemptions
        index = 0
        while index < len(self.running) and budget > 0:
            seq = self.running[index]
            if seq.seq_id in in_flight:
                index += 1
                continue
            num_new_tokens = min(seq.num_uncomputed_tokens, budget)
            if not self._allocate_or_preempt(seq, num_new_tokens, index, in_flight):
                break
            scheduled.append(ScheduledSequence(seq, num_new_tokens, seq.num_computed_tokens))
            budget -= num_new_tokens
            index += 1
        # NOTE: nothing is admitted in a step that had to preempt: the cache is under pressure.
        if self.num_preemptions == num_preempted_before:
            budget = self._admit_waiting(budget, scheduled)
        finished_ids, self._finished_seq_ids = tuple(self._finished_seq_ids), []
        return SchedulerOutput(tuple(scheduled), self.max_num_batched_tokens - budget, finished_ids)

    def update(self, output: SchedulerOutput, sampled_token_ids: dict[int, int]) -> list[Sequence]:
        """Advance computed counts, append sampled tokens, stop what is done. Returns the sequences
        that received a token this step (finished ones included)."""
        appended: list[Sequence] = []
        for item in output.scheduled:
            seq = item.seq
            if seq.is_finished:
                continue
            num_computed_before = seq.num_computed_tokens
            seq.num_computed_tokens += item.num_new_tokens
            self.block_manager.cache_full_blocks(seq, num_computed_before)
            if seq.pending_forks and seq.is_prefill_done:
                self._start_forks(seq)
            if item.is_sampling and seq.is_pooling:
                # pooled by the runner this step; its blocks go back to the pool at once
                self.finish(seq, SequenceStatus.FINISHED_STOPPED)
            elif item.is_sampling:
                seq.append_token(sampled_token_ids[seq.seq_id])
                appended.append(seq)
                status, reason = self._check_stop(seq)
                if status is not None:
                    self.finish(seq, status, reason)
        return appended

    def finish(self, seq: Sequence, status: SequenceStatus, stop_reason: int | str | None = None) -> None:
        """End a sequence (stopped, out of length, or aborted) and free its blocks at once."""
        if seq.is_finished:
            return
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        seq.status = status
        seq.stop_reason = stop_reason
        self.block_manager.free(seq)
        self._finished_seq_ids.append(seq.seq_id)
        for child in seq.pending_forks:
            self.finish(child, status)
        seq.pending_forks = []

    def _allocate_or_preempt(self, seq: Sequence, num_new_tokens: int, index: int, in_flight: frozenset[int]) -> bool:
        """`seq` is running[index]; the victims are the newest sequences after it that are not in flight."""
        while not self.block_manager.allocate(seq, num_new_tokens):
            position = next(p for p in range(len(self.running) - 1, index - 1, -1)
                            if self.running[p].seq_id not in in_flight)
            victim = self.running.pop(position)
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def _admit_waiting(self, budget: int, scheduled: list[ScheduledSequence]) -> int:
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            cached_block_ids: list[int] = []
            if not seq.block_ids and seq.params.prompt_logprobs is None:
                cached_block_ids = self.block_manager.find_cached_prefix(seq)
            num_cached_tokens = len(cached_block_ids) * self.block_manager.block_size
            num_new_tokens = min(seq.num_uncomputed_tokens - num_cached_tokens, budget)
            if not self.chunked_prefill and num_new_tokens < seq.num_uncomputed_tokens - num_cached_tokens:
                break
            if not self.block_manager.allocate(seq, num_new_tokens, cached_block_ids):
                break
            self.waiting.popleft()
            if seq.num_preemptions == 0 and seq.num_computed_tokens == 0:
                seq.num_cached_tokens = num_cached_tokens
            seq.num_computed_tokens += num_cached_tokens
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            scheduled.append(ScheduledSequence(seq, num_new_tokens, seq.num_computed_tokens))
            budget -= num_new_tokens
        return budget

    def _start_forks(self, parent: Sequence) -> None:
        for child in reversed(parent.pending_forks):
            self.block_manager.fork(parent, child)
            self.waiting.appendleft(child)
        parent.pending_forks = []

    def _check_stop(self, seq: Sequence) -> tuple[SequenceStatus | None, int | None]:
        token_id = seq.token_ids[-1]
        params = seq.params
        if seq.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and token_id in seq.eos_token_ids:
                return SequenceStatus.FINISHED_STOPPED, None
            if token_id in params.stop_token_ids:
                return SequenceStatus.FINISHED_STOPPED, token_id
        if seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            return SequenceStatus.FINISHED_LENGTH, None
        return None, None
