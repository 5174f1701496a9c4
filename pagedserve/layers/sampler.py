"""Turn one row of logits per sampling sequence into a token: the grammar mask, bias, penalties,
temperature, top-k/p, min-p, then a draw. Seeded sequences draw from their own generator, so a seeded request samples the
same tokens whether it runs alone or inside any batch.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import xgrammar as xgr

from pagedserve.sampling_params import SamplingParams


@dataclass(frozen=True)
class SamplingRow:
    """What the sampler needs to know about one sequence this step."""

    seq_id: int
    params: SamplingParams
    token_ids: list[int]             # prompt + output so far (the sequence's own list, not a copy)
    num_prompt_tokens: int
    eos_token_ids: frozenset[int]
    # Structured output: the sequence's matcher, already advanced to its output so far.
    grammar: xgr.GrammarMatcher | None = None

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[:self.num_prompt_tokens]

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]


@dataclass(frozen=True)
class TokenLogprobs:
    """A token's log-probability and rank, and the top alternatives (raw model distribution)."""

    token_id: int
    logprob: float
    rank: int
    top_token_ids: list[int]
    top_logprobs: list[float]


@dataclass(frozen=True)
class SamplerOutput:
    token_ids: list[int]                        # one per row
    logprobs: list[TokenLogprobs | None]        # None where the request asked for none


class Sampler:
    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self._generators: dict[int, torch.Generator] = {}
        self._default_generator = torch.Generator(device=device)
        self._default_generator.manual_seed(seed)
        self._bitmask: torch.Tensor | None = None     # [rows, ceil(vocab_size / 32)] int32, reused

    def forget(self, seq_ids: tuple[int, ...]) -> None:
        for seq_id in seq_ids:
            self._generators.pop(seq_id, None)

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        """logits: [num_rows, vocab_size] float32."""
        raw_logprobs = None
        if any(row.params.logprobs is not None for row in rows):
            raw_logprobs = torch.log_softmax(logits, dim=-1)
        logits = logits.clone()
        self._apply_grammar_masks(logits, rows)
        for index, row in enumerate(rows):
            _apply_row_processors(logits[index], row)
        token_ids = self._choose(logits, rows)
        return SamplerOutput(token_ids.tolist(), _gather_logprobs(raw_logprobs, token_ids, rows))

    def _apply_grammar_masks(self, logits: torch.Tensor, rows: list[SamplingRow]) -> None:
        """Disallowed tokens of every constrained row to -inf, in one call for the whole batch."""
        constrained = [index for index, row in enumerate(rows) if row.grammar is not None]
        if not constrained:
            return
        num_rows, vocab_size = logits.shape
        if self._bitmask is None or self._bitmask.shape[0] < num_rows or \
                self._bitmask.shape[1] * 32 < vocab_size:
            self._bitmask = xgr.allocate_token_bitmask(max(num_rows, 8), vocab_size)
        bitmask = self._bitmask[:num_rows]
        for index in constrained:
            grammar = rows[index].grammar
            assert grammar is not None
            grammar.fill_next_token_bitmask(bitmask, index)
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=vocab_size, indices=constrained)

    def _choose(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        token_ids = logits.argmax(dim=-1)
        random_rows = [i for i, row in enumerate(rows) if not row.params.is_greedy]
        if not random_rows:
            return token_ids
        index = torch.tensor(random_rows, device=logits.device)
        probs = _filtered_probs(logits[index], [rows[i].params for i in random_rows])
        # Exponential race: argmax(p / E) with E ~ Exp(1) draws from p, one independent draw per row.
        noise = torch.empty_like(probs)
        for position, row_index in enumerate(random_rows):
            noise[position].exponential_(generator=self._generator_for(rows[row_index]))
        token_ids[index] = (probs / noise).argmax(dim=-1)
        return token_ids

    def _generator_for(self, row: SamplingRow) -> torch.Generator:
        if row.params.seed is None:
            return self._default_generator
        generator = self._generators.get(row.seq_id)
        if generator is None:
            generator = torch.Generator(device=self.device)
            generator.manual_seed(row.params.seed)
            self._generators[row.seq_id] = generator
        return generator


def _apply_row_processors(logits: torch.Tensor, row: SamplingRow) -> None:
    """In place on one row [vocab_size]: logit bias, banned stops before min_tokens, penalties."""
    params = row.params
    vocab_size = logits.shape[0]
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias.keys()), device=logits.device)
        logits[ids] += torch.tensor(list(params.logit_bias.values()), device=logits.device)
    # NOTE: a grammar decides itself when the answer may end; banning the end it requires would leave
    # no token at all.
    if row.grammar is None and len(row.token_ids) - row.num_prompt_tokens < params.min_tokens:
        banned = set(params.stop_token_ids) | (set() if params.ignore_eos else set(row.eos_token_ids))
        banned_ids = [t for t in banned if t < vocab_size]
        if banned_ids:
            logits[banned_ids] = float("-inf")
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(row.token_ids)), device=logits.device, dtype=torch.long)
        seen_logits = logits[seen]
        logits[seen] = torch.where(seen_logits > 0, seen_logits / params.repetition_penalty,
                                   seen_logits * params.repetition_penalty)
    if (params.presence_penalty or params.frequency_penalty) and len(row.token_ids) > row.num_prompt_tokens:
        counts = torch.bincount(torch.tensor(row.output_token_ids, device=logits.device), minlength=vocab_size)
        counts = counts[:vocab_size].to(logits.dtype)
        logits -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(logits.dtype)


def _filtered_probs(logits: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """Temperature, top-k, top-p and min-p over [num_rows, vocab_size]; returns probabilities."""
    temperatures = torch.tensor([p.temperature for p in params], device=logits.device)
    logits = logits / temperatures[:, None]
    top_ks = [p.top_k for p in params]
    if any(top_ks):
        vocab_size = logits.shape[1]
        ks = torch.tensor([k if k else vocab_size for k in top_ks], device=logits.device).clamp(max=vocab_size)
        kth_values = logits.sort(dim=-1, descending=True).values.gather(1, (ks - 1)[:, None])
        logits = logits.masked_fill(logits < kth_values, float("-inf"))
    top_ps = torch.tensor([p.top_p for p in params], device=logits.device)[:, None]
    if bool((top_ps < 1.0).any()):
        probs = logits.softmax(dim=-1)
        sorted_probs = probs.sort(dim=-1, descending=True).values
        # Drop a token when the tokens strictly more likely already reach top_p: the least likely token
        # kept is the one whose mass reaches top_p, and every token as likely as it stays too (which of
        # two equally likely tokens survives must not depend on their ids).
        num_short = (sorted_probs.cumsum(dim=-1) < top_ps).sum(dim=-1, keepdim=True)
        least_kept = sorted_probs.gather(1, num_short.clamp(max=logits.shape[1] - 1))
        # NOTE: top_p 1 keeps everything, also when the float32 running sum reaches 1 before the tail.
        least_kept = least_kept.masked_fill(top_ps >= 1.0, 0.0)
        logits = logits.masked_fill(probs < least_kept, float("-inf"))
    probs = logits.softmax(dim=-1)
    min_ps = [p.min_p for p in params]
    if any(min_ps):
        threshold = torch.tensor(min_ps, device=logits.device)[:, None] * probs.max(dim=-1, keepdim=True).values
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs


def _gather_logprobs(raw_logprobs: torch.Tensor | None, token_ids: torch.Tensor,
                     rows: list[SamplingRow]) -> list[TokenLogprobs | None]:
    results: list[TokenLogprobs | None] = []
    for index, row in enumerate(rows):
        num_top = row.params.logprobs
        if num_top is None or raw_logprobs is None:
            results.append(None)
            continue
        results.append(token_logprobs(raw_logprobs[index], int(token_ids[index]), num_top))
    return results


def token_logprobs(logprobs: torch.Tensor, token_id: int, num_top: int) -> TokenLogprobs:
    """One position: the logprob and rank of `token_id` and the `num_top` most likely tokens."""
    chosen = logprobs[token_id]
    rank = int((logprobs > chosen).sum()) + 1
    top_ids: list[int] = []
    top_values: list[float] = []
    if num_top:
        top = logprobs.topk(num_top)
        top_ids, top_values = top.indices.tolist(), top.values.tolist()
    return TokenLogprobs(token_id, float(chosen), rank, top_ids, top_values)
