"""The block manager alone: allocation, sharing, prefix cache, eviction order. No model, no torch."""
import pytest

from pagedserve.engine.block_manager import BlockManager, hash_block
from pagedserve.engine.sequence import Sequence
from pagedserve.sampling_params import SamplingParams

BLOCK = 4


def make_seq(tokens: list[int], request_id: str = "r") -> Sequence:
    return Sequence(request_id, list(tokens), SamplingParams(), max_tokens=16)


def compute(manager: BlockManager, seq: Sequence, num_tokens: int) -> None:
    """What a step does for `seq`: allocate, 'compute' num_tokens, register full blocks."""
    assert manager.allocate(seq, num_tokens)
    before = seq.num_computed_tokens
    seq.num_computed_tokens += num_tokens
    manager.cache_full_blocks(seq, before)


def test_allocates_exactly_the_blocks_needed_and_frees_them():
    manager = BlockManager(num_blocks=8, block_size=BLOCK)
    seq = make_seq(range(10))
    assert manager.allocate(seq, 10)
    assert len(seq.block_ids) == 3 and len(set(seq.block_ids)) == 3
    assert manager.num_free_blocks == 5
    seq.num_computed_tokens = 10
    assert manager.allocate(seq, 2)            # tokens 10, 11 still fit block 3
    assert len(seq.block_ids) == 3
    assert manager.allocate(seq, 3)            # token 12 needs a 4th block
    assert len(seq.block_ids) == 4
    manager.free(seq)
    assert seq.block_ids == [] and manager.num_free_blocks == 8


def test_allocation_fails_without_side_effects_when_full():
    manager = BlockManager(num_blocks=3, block_size=BLOCK)
    first, second = make_seq(range(8)), make_seq(range(100, 108))
    assert manager.allocate(first, 8)
    assert not manager.allocate(second, 8)
    assert second.block_ids == [] and manager.num_free_blocks == 1


def test_prefix_cache_hit_shares_blocks_and_leaves_one_token_to_compute():
    manager = BlockManager(num_blocks=16, block_size=BLOCK)
    first = make_seq(list(range(12)) + [50, 51])
    compute(manager, first, first.num_tokens)
    second = make_seq(list(range(12)) + [60])
    hits = manager.find_cached_prefix(second)
    assert hits == first.block_ids[:3]
    # A prompt that is exactly the cached blocks still computes its last token itself.
    exact = make_seq(list(range(12)))
    assert manager.find_cached_prefix(exact) == first.block_ids[:2]
    assert manager.allocate(second, 1, hits)
    assert all(manager.blocks[b].ref_count == 2 for b in hits)
    assert manager.num_prefix_hits == 12 + 8


def test_freed_blocks_stay_cached_until_evicted_least_recently_freed_first():
    manager = BlockManager(num_blocks=4, block_size=BLOCK)
    old = make_seq(range(0, 9))
    compute(manager, old, 9)                      # 3 blocks, 2 full ones cached
    manager.free(old)
    assert manager.num_free_blocks == 4           # cached blocks count as free
    revived = make_seq(range(0, 9))
    assert len(manager.find_cached_prefix(revived)) == 2
    # Fill the pool with other tokens: the cached blocks must be reused, and then no longer hit.
    other = make_seq(range(100, 116))
    compute(manager, other, 16)
    assert manager.find_cached_prefix(make_seq(range(0, 9))) == []


def test_eviction_prefers_the_tail_of_a_freed_sequence():
    manager = BlockManager(num_blocks=4, block_size=BLOCK)
    seq = make_seq(range(17))
    compute(manager, seq, 16)
    head, tail = seq.block_ids[0], seq.block_ids[3]
    manager.free(seq)
    taker = make_seq(range(200, 204))
    assert manager.allocate(taker, 4)
    assert taker.block_ids == [tail]
    assert manager.blocks[head].block_hash is not None


def test_hash_collision_is_guarded_by_token_comparison(monkeypatch):
    manager = BlockManager(num_blocks=8, block_size=BLOCK)
    monkeypatch.setattr("pagedserve.engine.block_manager.hash_block", lambda parent, tokens: b"same")
    first = make_seq(range(9))
    compute(manager, first, 9)
    impostor = make_seq(range(100, 109))
    assert manager.find_cached_prefix(impostor) == []


def test_chained_hash_depends_on_everything_before():
    assert hash_block(None, [1, 2]) != hash_block(hash_block(None, [0, 0]), [1, 2])
    assert hash_block(None, [1, 2]) == hash_block(None, [1, 2])


def test_fork_shares_full_prompt_blocks_with_reference_counts():
    manager = BlockManager(num_blocks=8, block_size=BLOCK, enable_prefix_caching=False)
    parent = make_seq(range(10))
    compute(manager, parent, 10)
    child = make_seq(range(10))
    manager.fork(parent, child)
    assert child.block_ids == parent.block_ids[:2]
    assert child.num_computed_tokens == 8
    assert [manager.blocks[b].ref_count for b in parent.block_ids] == [2, 2, 1]
    manager.free(parent)
    manager.free(child)
    assert manager.num_free_blocks == 8


def test_disabled_prefix_cache_never_hits():
    manager = BlockManager(num_blocks=8, block_size=BLOCK, enable_prefix_caching=False)
    first = make_seq(range(9))
    compute(manager, first, 9)
    assert manager.find_cached_prefix(make_seq(range(9))) == []


def test_double_free_is_caught():
    manager = BlockManager(num_blocks=2, block_size=BLOCK)
    seq = make_seq(range(3))
    manager.allocate(seq, 3)
    ids = list(seq.block_ids)
    manager.free(seq)
    seq.block_ids = ids
    with pytest.raises(AssertionError):
        manager.free(seq)


def test_blocks_are_never_shared_across_lora_adapters():
    manager = BlockManager(num_blocks=16, block_size=4)
    base = Sequence("base", list(range(9)), SamplingParams(), max_tokens=4)
    compute(manager, base, 9)
    for key in (1, 2):
        adapted = Sequence(f"lora{key}", list(range(9)), SamplingParams(), max_tokens=4, lora_key=key)
        assert manager.find_cached_prefix(adapted) == []
        compute(manager, adapted, 9)
    again = Sequence("again", list(range(9)), SamplingParams(), max_tokens=4, lora_key=2)
    assert len(manager.find_cached_prefix(again)) == 2
