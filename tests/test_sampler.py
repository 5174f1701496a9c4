"""The sampler by its effect on known distributions: which tokens each filter keeps, how much each
penalty moves which logits, and which tokens a seed draws alone and inside a batch. No model needed."""
from __future__ import annotations

import math

import pytest
import torch

from pagedserve.layers.sampler import Sampler, SamplingRow, _apply_row_processors, _filtered_probs
from pagedserve.sampling_params import SamplingParams

CPU = torch.device("cpu")
EOS = 7
VOCAB_SIZE = 8


def logits_of(probs: list[float]) -> torch.Tensor:
    """Logits whose softmax is `probs` ([vocab_size] float32; a probability of 0 is -inf)."""
    return torch.tensor([math.log(p) if p > 0 else float("-inf") for p in probs])


def kept(probs: list[float], **params) -> set[int]:
    """The tokens `_filtered_probs` leaves a chance to, for one row."""
    filtered = _filtered_probs(logits_of(probs)[None, :], [SamplingParams(**params)])
    return set(torch.nonzero(filtered[0]).flatten().tolist())


def row(seq_id: int = 0, prompt: tuple[int, ...] = (1,), output: tuple[int, ...] = (), **params) -> SamplingRow:
    return SamplingRow(seq_id, SamplingParams(**params), [*prompt, *output], len(prompt), frozenset({EOS}))


def processed(logits: list[float], sampling_row: SamplingRow) -> list[float]:
    """The row's logits after bias, min_tokens and penalties."""
    tensor = torch.tensor(logits)
    _apply_row_processors(tensor, sampling_row)
    return tensor.tolist()


def draws(sampler: Sampler, logits: torch.Tensor, rows: list[SamplingRow]) -> list[int]:
    return sampler(logits, rows).token_ids


# ---- temperature and greedy --------------------------------------------------------------------

def test_greedy_is_the_argmax_of_the_processed_logits():
    logits = torch.tensor([[0.1, 2.0, -1.0, 1.9, 0.0, 0.0, 0.0, 0.0],
                           [3.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]])
    rows = [row(0, temperature=0), row(1, temperature=0, logit_bias={5: 4.0})]
    assert draws(Sampler(CPU), logits, rows) == [1, 5]    # the bias moved the second row's argmax
    # Greedy ignores the filters and the seed: the same token every time.
    greedy = row(2, temperature=0, top_k=3, top_p=0.1, min_p=0.9, seed=3)
    assert {draws(Sampler(CPU, seed=s), logits[:1], [greedy])[0] for s in range(5)} == {1}


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_temperature_divides_the_logits(temperature):
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    probs = _filtered_probs(logits, [SamplingParams(temperature=temperature)])
    expected = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).div(temperature).softmax(dim=-1)
    assert torch.allclose(probs, expected, atol=1e-7)
    assert (probs[0, 0] > probs[0, 1]).item()


# ---- top-k, top-p, min-p: exactly the right tokens kept ---------------------------------------------

@pytest.mark.parametrize("top_k, expected", [(1, {0}), (2, {0, 1}), (3, {0, 1, 2}), (4, {0, 1, 2, 3}),
                                             (5, {0, 1, 2, 3}), (1000, {0, 1, 2, 3}), (0, {0, 1, 2, 3}),
                                             (-1, {0, 1, 2, 3})])
def test_top_k_keeps_the_k_most_likely(top_k, expected):
    assert kept([0.4, 0.3, 0.2, 0.1], top_k=top_k) == expected


def test_top_k_keeps_every_token_tied_with_the_kth():
    # As vLLM and Hugging Face do: a token as likely as the k-th cannot be told apart from it.
    assert kept([0.4, 0.2, 0.2, 0.2], top_k=2) == {0, 1, 2, 3}
    assert kept([0.3, 0.3, 0.2, 0.2], top_k=2) == {0, 1}


@pytest.mark.parametrize("top_p, expected", [
    (0.25, {0}), (0.5, {0}),                   # the top token alone reaches them; exactly 0.5 is enough
    (0.5001, {0, 1}), (0.75, {0, 1}),          # the mass lands exactly on 0.75 with two tokens
    (0.7501, {0, 1, 2}), (0.875, {0, 1, 2}),
    (0.8751, {0, 1, 2, 3, 4}), (1.0, {0, 1, 2, 3, 4}),
])
def test_top_p_keeps_the_fewest_most_likely_tokens_that_reach_it(top_p, expected):
    # Powers of two: softmax and the running sums are exact in float32, so the boundaries are exact too.
    assert kept([0.5, 0.25, 0.125, 0.0625, 0.0625], top_p=top_p) == expected


def test_top_p_keeps_equally_likely_tokens_together():
    """A token is dropped when the tokens strictly more likely already reach top_p, so which of two
    equally likely tokens survives never depends on their ids."""
    assert kept([0.5, 0.25, 0.125, 0.125], top_p=0.8) == {0, 1, 2, 3}
    for probs in ([0.4, 0.3, 0.3], [0.3, 0.4, 0.3], [0.3, 0.3, 0.4]):
        assert kept(probs, top_p=0.5) == {0, 1, 2}
    assert kept([0.1] * 10, top_p=0.3) == set(range(10))
    assert kept([0.4, 0.3, 0.3], top_p=0.35) == {0}


def test_top_p_of_one_keeps_every_token_whatever_else_is_in_the_batch():
    # One very likely token: the float32 running sum reaches 1.0 long before the tail is summed.
    peaked = torch.full((1000,), -20.0)
    peaked[0] = 0.0
    logits = torch.stack([peaked, torch.zeros(1000)])
    alone = _filtered_probs(logits[:1], [SamplingParams(top_p=1.0)])
    in_batch = _filtered_probs(logits, [SamplingParams(top_p=1.0), SamplingParams(top_p=0.5)])
    assert int((alone[0] > 0).sum()) == 1000
    assert torch.equal(in_batch[0], alone[0])
    assert int((in_batch[1] > 0).sum()) == 1000      # uniform: every token is as likely as the kept ones


@pytest.mark.parametrize("min_p, expected", [(0.0, {0, 1, 2, 3}), (0.1, {0, 1, 2, 3}), (0.125, {0, 1, 2, 3}),
                                             (0.2, {0, 1, 2}), (0.375, {0, 1, 2}), (0.376, {0, 1}),
                                             (0.5, {0, 1}), (0.51, {0}), (1.0, {0})])
def test_min_p_keeps_tokens_at_least_that_fraction_of_the_most_likely(min_p, expected):
    # The top token has 0.5; on each boundary (0.125 * 0.5 = 0.0625, 0.375 * 0.5 = 0.1875, 0.5 * 0.5 = 0.25)
    # the token exactly at the threshold is kept.
    assert kept([0.5, 0.25, 0.1875, 0.0625], min_p=min_p) == expected


def test_min_p_is_relative_to_the_most_likely_token_not_absolute():
    # The top token has only 0.25: min_p 0.5 keeps everything at 0.125 or above.
    assert kept([0.25, 0.25, 0.1875, 0.1875, 0.125, 0.0625], min_p=0.5) == {0, 1, 2, 3, 4}


def test_filters_compose_in_order():
    probs = [0.3, 0.25, 0.2, 0.15, 0.1]
    assert kept(probs, top_k=4, top_p=0.5) == {0, 1}
    # top-k then min-p: the threshold is relative to the top token, which top-k keeps.
    assert kept(probs, top_k=3, min_p=0.6) == {0, 1, 2}
    assert kept(probs, top_p=0.7, min_p=0.8) == {0, 1}


def test_drawn_tokens_are_exactly_the_kept_ones():
    """Through the public call: 400 seeded rows of one distribution draw every kept token and no other."""
    probs = [0.3, 0.25, 0.2, 0.15, 0.1, 0.0, 0.0, 0.0]
    logits = logits_of(probs).repeat(400, 1)
    cases = {(("top_k", 3),): {0, 1, 2}, (("top_p", 0.5),): {0, 1}, (("min_p", 0.4),): {0, 1, 2, 3},
             (("top_k", 4), ("min_p", 0.6)): {0, 1, 2}, (): {0, 1, 2, 3, 4}}
    for settings, expected in cases.items():
        rows = [row(seed, seed=seed, **dict(settings)) for seed in range(400)]
        assert set(draws(Sampler(CPU), logits, rows)) == expected, settings


# ---- penalties and bias: exactly the right logits, by the right amount -----------------------------

LOGITS = [1.0, 2.0, -2.0, 3.0, -1.0, 0.5, 0.0, 4.0]


def changed(after: list[float]) -> dict[int, float]:
    return {token_id: value for token_id, (value, before) in enumerate(zip(after, LOGITS)) if value != before}


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_prompt_and_output():
    sampling_row = row(prompt=(1, 2), output=(2, 4, 4), repetition_penalty=2.0)
    assert changed(processed(LOGITS, sampling_row)) == {1: 1.0, 2: -4.0, 4: -2.0}
    # Below 1 it favours the tokens seen instead.
    encouraging = row(prompt=(1,), output=(4,), repetition_penalty=0.5)
    assert changed(processed(LOGITS, encouraging)) == {1: 4.0, 4: -0.5}
    # A zero logit stays zero (neither positive nor negative).
    assert changed(processed(LOGITS, row(prompt=(6,), repetition_penalty=2.0))) == {}


def test_presence_and_frequency_penalties_count_output_tokens_only():
    output = (3, 3, 3, 5)
    prompt = (1, 5)
    presence = row(prompt=prompt, output=output, presence_penalty=0.5)
    assert changed(processed(LOGITS, presence)) == {3: 2.5, 5: 0.0}
    frequency = row(prompt=prompt, output=output, frequency_penalty=0.25)
    assert changed(processed(LOGITS, frequency)) == {3: 2.25, 5: 0.25}
    both = row(prompt=prompt, output=output, presence_penalty=0.5, frequency_penalty=0.25)
    assert changed(processed(LOGITS, both)) == {3: 1.75, 5: -0.25}
    negative = row(prompt=prompt, output=output, presence_penalty=-1.0, frequency_penalty=-0.5)
    assert changed(processed(LOGITS, negative)) == {3: 5.5, 5: 2.0}
    # Before any output token the prompt's tokens are not penalized.
    assert changed(processed(LOGITS, row(prompt=prompt, presence_penalty=2.0, frequency_penalty=2.0))) == {}


def test_logit_bias_adds_to_the_named_tokens_only():
    biased = row(logit_bias={0: 5.0, 2: -100.0, 6: 0.25})
    assert changed(processed(LOGITS, biased)) == {0: 6.0, 2: -102.0, 6: 0.25}


def test_min_tokens_bans_eos_and_stop_ids_until_enough_output():
    def banned(sampling_row: SamplingRow) -> set[int]:
        return {t for t, value in enumerate(processed(LOGITS, sampling_row)) if value == float("-inf")}

    params = dict(min_tokens=3, stop_token_ids=[2, 5])
    assert banned(row(output=(), **params)) == {2, 5, EOS}
    assert banned(row(output=(0, 1), **params)) == {2, 5, EOS}
    assert banned(row(output=(0, 1, 3), **params)) == set()               # three out: they may end it now
    assert banned(row(output=(0,), min_tokens=3, stop_token_ids=[2], ignore_eos=True)) == {2}
    assert banned(row(output=(), min_tokens=0, stop_token_ids=[2])) == set()
    # Through the public call: EOS is the argmax, yet greedy picks the next best until min_tokens.
    logits = torch.tensor([LOGITS])
    assert draws(Sampler(CPU), logits, [row(output=(0,), temperature=0, min_tokens=2)]) == [3]
    assert draws(Sampler(CPU), logits, [row(output=(0, 0), temperature=0, min_tokens=2)]) == [EOS]


# ---- seeds ------------------------------------------------------------------------------------------

FLAT = torch.zeros(VOCAB_SIZE)


def run_steps(sampler: Sampler, target: SamplingRow, others: list[SamplingRow], num_steps: int = 24) -> list[int]:
    """`target`'s draws over `num_steps` steps, placed among `others` at a different position each step."""
    tokens = []
    for step in range(num_steps):
        position = step % (len(others) + 1)
        rows = [*others[:position], target, *others[position:]]
        tokens.append(draws(sampler, FLAT.repeat(len(rows), 1), rows)[position])
    return tokens


def test_a_seeded_row_draws_the_same_tokens_alone_and_inside_any_batch():
    target = row(100, seed=1234, top_p=1.0)
    alone = run_steps(Sampler(CPU, seed=0), target, [])
    others = [row(1), row(2, seed=7, top_k=3), row(3, temperature=0), row(4, top_p=0.3, min_p=0.5, temperature=2)]
    assert run_steps(Sampler(CPU, seed=99), target, others) == alone
    assert run_steps(Sampler(CPU, seed=5), target, others[::-1]) == alone
    assert len(set(alone)) > 3                                   # it is sampling, not stuck on one token
    # Another sequence with the same seed (the same request sent again) draws the same tokens too.
    assert run_steps(Sampler(CPU), row(200, seed=1234, top_p=1.0), others) == alone


def test_different_seeds_draw_differently():
    sequences = {tuple(run_steps(Sampler(CPU), row(seed, seed=seed), [])) for seed in range(5)}
    assert len(sequences) == 5


def test_unseeded_rows_draw_from_the_engine_seed():
    def unseeded(engine_seed: int) -> list[int]:
        return run_steps(Sampler(CPU, seed=engine_seed), row(0), [row(1)])

    assert unseeded(7) == unseeded(7)
    assert unseeded(7) != unseeded(8)


def test_a_forgotten_sequence_starts_again_from_its_seed():
    sampler = Sampler(CPU)
    target = row(5, seed=42)
    first = run_steps(sampler, target, [], num_steps=6)
    assert run_steps(sampler, target, [], num_steps=6) != first     # the generator moved on
    sampler.forget((5,))
    assert run_steps(sampler, target, [], num_steps=6) == first
