"""Benchmark prompts: random token sequences of a fixed length, reproducible by seed.

As in vLLM's random dataset, prompts are random token ids from the tokenizer's vocabulary; each
seed gives different prompts, so a server cannot answer a second run from its prefix cache.
"""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class BenchPrompt:
    token_ids: list[int]
    text: str
    output_len: int


def random_prompts(tokenizer, num_prompts: int, input_len: int, output_len: int, seed: int) -> list[BenchPrompt]:
    """`num_prompts` prompts of `input_len` tokens (text re-encodes to about that many tokens)."""
    rng = random.Random(seed)
    special = set(tokenizer.all_special_ids)
    # Skip the first ids (bytes and specials in most vocabularies) so the text stays ordinary.
    candidates = [i for i in range(min(len(tokenizer), 1 << 20)) if i not in special and i >= 256]
    prompts = []
    for _ in range(num_prompts):
        ids = [rng.choice(candidates) for _ in range(input_len)]
        prompts.append(BenchPrompt(ids, tokenizer.decode(ids), output_len))
    return prompts
