"""KV cache blocks: allocation, reference counts, and the prefix cache. No torch here.

A block holds the K/V of `block_size` consecutive tokens of some sequence. A full block is named by a
chained hash of its tokens and of every token before it, so two sequences with the same prefix name
the same blocks and can share them. Blocks whose reference count drops to zero go to the free list
but keep their hash: until they are handed out again (least recently freed first) a new request with
the same prefix can take them back without recomputing.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence as SequenceOf
from dataclasses import dataclass

from pagedserve.engine.sequence import Sequence


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None
    # NOTE: kept to guard against hash collisions: a hit must also match these tokens exactly.
    token_ids: tuple[int, ...] | None = None


def chain_root(lora_key: int) -> bytes | None:
    """The parent of a sequence's first block: none for the base model, the LoRA adapter's own otherwise.

    So the chain, and every block in it, is never shared across adapters: the same tokens have
    different K/V under each.
    """
    if not lora_key:
        return None
    return hashlib.blake2b(b"lora" + array("q", [lora_key]).tobytes(), digest_size=16).digest()


def hash_block(parent_hash: bytes | None, token_ids: list[int]) -> bytes:
    """Chained hash of one full block: depends on the block's tokens and on all blocks before it."""
    digest = hashlib.blake2b(digest_size=16)
    if parent_hash is not None:
        digest.update(parent_hash)
    digest.update(array("q", token_ids).tobytes())
    return digest.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got {num_blocks}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(block_id) for block_id in range(num_blocks)]
        # Insertion order is eviction order: the front is handed out first.
        self._free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self._cached_block_ids: dict[bytes, int] = {}
        # Prefix cache statistics, in tokens.
        self.num_prefix_queries = 0
        self.num_prefix_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free_block_ids)

    @property
    def usage(self) -> float:
        """Share of blocks held by live sequences (free blocks that are still cached count as free)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, seq: Sequence) -> list[int]:
        """Ids of cached blocks holding a prefix of `seq`, longest first-match; counts a cache query.

        At least one token is always left to compute, since the step that computes it makes the logits.
        """
        self.num_prefix_queries += seq.num_tokens
        if not self.enable_prefix_caching:
            return []
        max_blocks = (seq.num_tokens - 1) // self.block_size
        self._hash_full_blocks(seq, max_blocks)
        hit_ids: list[int] = []
        for index in range(max_blocks):
            block_id = self._cached_block_ids.get(seq.block_hashes[index])
            if block_id is None or self.blocks[block_id].token_ids != tuple(self._block_tokens(seq, index)):
                break
            hit_ids.append(block_id)
        self.num_prefix_hits += len(hit_ids) * self.block_size
        return hit_ids

    def can_allocate(self, seq: Sequence, num_new_tokens: int, cached_block_ids: SequenceOf[int] = ()) -> bool:
        num_tokens = seq.num_computed_tokens + len(cached_block_ids) * self.block_size + num_new_tokens
        num_new_blocks = self.num_blocks_for(num_tokens) - len(seq.block_ids) - len(cached_block_ids)
        num_revived = sum(1 for block_id in cached_block_ids if self.blocks[block_id].ref_count == 0)
        return num_new_blocks <= self.num_free_blocks - num_revived

    def allocate(self, seq: Sequence, num_new_tokens: int, cached_block_ids: SequenceOf[int] = ()) -> bool:
        """Give `seq` the cached blocks plus enough fresh ones for `num_new_tokens` more tokens.

        Returns False, changing nothing, when the free list is too short.
        """
        if not self.can_allocate(seq, num_new_tokens, cached_block_ids):
            return False
        for block_id in cached_block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free_block_ids[block_id]
            block.ref_count += 1
        seq.block_ids.extend(cached_block_ids)
        num_tokens = seq.num_computed_tokens + len(cached_block_ids) * self.block_size + num_new_tokens
        for _ in range(self.num_blocks_for(num_tokens) - len(seq.block_ids)):
            seq.block_ids.append(self._take_free_block())
        return True

    def fork(self, parent: Sequence, child: Sequence) -> None:
        """Share the parent's full prompt blocks with a sibling (n > 1): the prompt is computed once."""
        num_shared = (parent.num_prompt_tokens - 1) // self.block_size
        for block_id in parent.block_ids[:num_shared]:
            self.blocks[block_id].ref_count += 1
        child.block_ids = parent.block_ids[:num_shared]
        child.block_hashes = parent.block_hashes[:num_shared]
        child.num_computed_tokens = num_shared * self.block_size

    def free(self, seq: Sequence) -> None:
        # NOTE: reversed, so a sequence's last blocks (the least shareable) are evicted first.
        for block_id in reversed(seq.block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} freed twice"
            if block.ref_count == 0:
                self._free_block_ids[block_id] = None
        seq.block_ids = []

    def cache_full_blocks(self, seq: Sequence, num_computed_before: int) -> None:
        """Register the blocks that became full (and computed) since `num_computed_before`."""
        if not self.enable_prefix_caching:
            return
        first = num_computed_before // self.block_size
        last = seq.num_computed_tokens // self.block_size
        if last <= first:
            return
        self._hash_full_blocks(seq, last)
        for index in range(first, last):
            block = self.blocks[seq.block_ids[index]]
            block_hash = seq.block_hashes[index]
            if block.block_hash is not None or block_hash in self._cached_block_ids:
                continue   # already cached, or an identical block computed by another sequence is
            block.block_hash = block_hash
            block.token_ids = tuple(self._block_tokens(seq, index))
            self._cached_block_ids[block_hash] = block.block_id

    def reset_prefix_cache(self) -> None:
        for block_id in self._cached_block_ids.values():
            self.blocks[block_id].block_hash = None
            self.blocks[block_id].token_ids = None
        self._cached_block_ids.clear()

    def _take_free_block(self) -> int:
        block_id, _ = self._free_block_ids.popitem(last=False)
        block = self.blocks[block_id]
        if block.block_hash is not None:
            del self._cached_block_ids[block.block_hash]
            block.block_hash = None
            block.token_ids = None
        block.ref_count = 1
        return block_id

    def _block_tokens(self, seq: Sequence, index: int) -> list[int]:
        return seq.token_ids[index * self.block_size:(index + 1) * self.block_size]

    def _hash_full_blocks(self, seq: Sequence, num_blocks: int) -> None:
        for index in range(len(seq.block_hashes), num_blocks):
            parent = seq.block_hashes[index - 1] if index else chain_root(seq.lora_key)
            seq.block_hashes.append(hash_block(parent, self._block_tokens(seq, index)))
