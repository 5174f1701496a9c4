"""Benchmark prompts, reproducible by seed: `random`, `long-prompt` and `shared-prefix`.

As in vLLM's random dataset, prompts are random token ids from the tokenizer's vocabulary; each
seed gives different prompts, so a server cannot answer a second run from its prefix cache.

- `random`: `input_len` random tokens per request (vLLM's `random`).
- `long-prompt`: the same, with defaults for a prefill test: one ~1,500-token prompt per request and a
  short answer, so TTFT measures prefill.
- `shared-prefix`: one random system prompt of `prefix_len` tokens shared by every request, then a
  different short question each (vLLM's `prefix_repetition` with one prefix). Sent to the chat
  endpoint, the prefix is a system message, as a chat application sends it.
"""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class BenchPrompt:
    token_ids: list[int]      # the user text's tokens (without `system`)
    text: str                 # the user text (the whole prompt on /v1/completions when there is no system)
    output_len: int
    system: str | None = None   # a system message before it (shared-prefix)

    @property
    def completion_prompt(self) -> str:
        """The text sent to /v1/completions: the system prompt, if any, then the user text."""
        return self.text if self.system is None else f"{self.system}\n\n{self.text}"

    def messages(self) -> list[dict[str, str]]:
        """The messages sent to /v1/chat/completions."""
        user = [{"role": "user", "content": self.text}]
        return user if self.system is None else [{"role": "system", "content": self.system}, *user]


@dataclass(frozen=True)
class DatasetDefaults:
    num_prompts: int
    input_len: int       # the prompt (random, long-prompt) or the question after the prefix (shared-prefix)
    output_len: int
    prefix_len: int = 0
    endpoint: str = "/v1/completions"


# NOTE: the shapes the issues measure: 1,500-token prompts for prefill; a 1,000-token system prompt with 64
# short questions for prefix caching.
DATASETS: dict[str, DatasetDefaults] = {
    "random": DatasetDefaults(num_prompts=32, input_len=128, output_len=128),
    "long-prompt": DatasetDefaults(num_prompts=8, input_len=1500, output_len=16),
    "shared-prefix": DatasetDefaults(num_prompts=64, input_len=24, output_len=32, prefix_len=1000,
                                     endpoint="/v1/chat/completions"),
}


def _candidate_ids(tokenizer) -> list[int]:
    # Skip the first ids (bytes and specials in most vocabularies) and BERT's [unusedN] entries (text that
    # re-encodes to several tokens), so the text stays ordinary.
    skipped = set(tokenizer.all_special_ids) | {i for token, i in tokenizer.get_vocab().items()
                                                 if token.startswith("[unused")}
    return [i for i in range(min(len(tokenizer), 1 << 20)) if i not in skipped and i >= 256]


def random_prompts(tokenizer, num_prompts: int, input_len: int, output_len: int, seed: int) -> list[BenchPrompt]:
    """`num_prompts` prompts of `input_len` tokens (text re-encodes to about that many tokens)."""
    rng = random.Random(seed)
    candidates = _candidate_ids(tokenizer)
    prompts = []
    for _ in range(num_prompts):
        ids = [rng.choice(candidates) for _ in range(input_len)]
        prompts.append(BenchPrompt(ids, tokenizer.decode(ids), output_len))
    return prompts


def shared_prefix_prompts(tokenizer, num_prompts: int, prefix_len: int, input_len: int, output_len: int,
                          seed: int) -> list[BenchPrompt]:
    """One system prompt of `prefix_len` random tokens, then `num_prompts` different questions of
    `input_len` random tokens each."""
    rng = random.Random(seed)
    candidates = _candidate_ids(tokenizer)
    system = tokenizer.decode([rng.choice(candidates) for _ in range(prefix_len)])
    prompts = []
    for _ in range(num_prompts):
        ids = [rng.choice(candidates) for _ in range(input_len)]
        prompts.append(BenchPrompt(ids, tokenizer.decode(ids), output_len, system=system))
    return prompts


def make_prompts(dataset: str, tokenizer, num_prompts: int, input_len: int, output_len: int, seed: int,
                 prefix_len: int = 0) -> list[BenchPrompt]:
    """The prompts of `dataset` (a key of DATASETS); raises ValueError for another name."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if dataset == "shared-prefix":
        return shared_prefix_prompts(tokenizer, num_prompts, prefix_len, input_len, output_len, seed)
    return random_prompts(tokenizer, num_prompts, input_len, output_len, seed)
