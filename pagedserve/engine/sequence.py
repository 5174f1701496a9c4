"""One generated sequence: its tokens, how many have KV in the cache, and where that KV lives."""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from enum import Enum

from pagedserve.outputs import PositionLogprobs
from pagedserve.sampling_params import SamplingParams


class SequenceStatus(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"

    @property
    def is_finished(self) -> bool:
        return self not in (SequenceStatus.WAITING, SequenceStatus.RUNNING)


_seq_counter = itertools.count()


@dataclass(eq=False)
class Sequence:
    """Scheduler-visible state of one sequence. Plain data: the scheduler and block manager mutate it."""

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    max_tokens: int                      # resolved: never None here
    eos_token_ids: frozenset[int] = frozenset()
    index: int = 0                       # which of the request's n outputs this is
    arrival_time: float = 0.0
    seq_id: int = field(default_factory=lambda: next(_seq_counter))
    token_ids: list[int] = field(init=False)
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0         # tokens whose K/V are in the cache
    num_cached_tokens: int = 0           # of the prompt, found in the prefix cache on admission
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)   # chained hashes of full blocks
    stop_reason: int | str | None = None
    # n > 1: siblings that start from this sequence's prompt KV once it is computed.
    pending_forks: list[Sequence] = field(default_factory=list)
    num_preemptions: int = 0
    lora_slot: int = 0                   # the LoRA adapter's slot in the model, 0 = the base model
    lora_key: int = 0                    # unique per loaded adapter: enters the prefix cache's hashes
    # An embedding request: its prompt is pooled once computed, then it ends (nothing is generated).
    is_pooling: bool = False
    # Sampler results, appended by the engine.
    cumulative_logprob: float = 0.0
    output_logprobs: list[PositionLogprobs] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def num_uncomputed_tokens(self) -> int:
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    @property
    def is_prefill_done(self) -> bool:
        return self.num_computed_tokens >= len(self.prompt_token_ids)

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.is_finished else None

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
