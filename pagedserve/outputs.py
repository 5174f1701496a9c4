"""What the engine hands back for each request."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Logprob:
    logprob: float
    rank: int                          # 1 = the most likely token
    decoded_token: str | None = None


# One position's logprobs: the chosen token first, then the top alternatives, keyed by token id.
PositionLogprobs = dict[int, Logprob]


@dataclass
class RequestMetrics:
    """Wall-clock times (time.time()) of one request's life, for latency metrics and usage."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_preemptions: int = 0
    token_gaps: list[float] = field(default_factory=list)   # between a step's new tokens and the next's


@dataclass
class CompletionOutput:
    """One of the `n` sequences of a request. In DELTA mode, text/token_ids/logprobs are the new part."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    logprobs: list[PositionLogprobs] | None = None
    finish_reason: str | None = None   # "stop", "length", "abort"
    stop_reason: int | str | None = None   # the stop string or stop token id that ended it
    num_output_tokens: int = 0         # total so far, also in DELTA mode

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    prompt_logprobs: list[PositionLogprobs | None] | None = None
    num_cached_tokens: int = 0
    metrics: RequestMetrics | None = None
    embedding: list[float] | None = None   # an embedding request's pooled vector (outputs is then empty)


@dataclass(frozen=True)
class EmbeddingOutput:
    embedding: list[float]

    @property
    def hidden_size(self) -> int:
        return len(self.embedding)


@dataclass(frozen=True)
class EmbeddingRequestOutput:
    """What `LLM.embed` returns per prompt, shaped like vLLM's: `output.outputs.embedding`."""

    request_id: str
    prompt_token_ids: list[int]
    outputs: EmbeddingOutput
    finished: bool = True
