"""Which data parallel replica serves a request: the least loaded, unless another holds its prompt's prefix.

Load is what the API process has sent a replica and not yet seen finish (its running + waiting sequences,
known without waiting for a step's stats). Prefix affinity follows SGLang's cache-aware router: the router
remembers, per replica, the chained hashes of the first blocks of the prompts it sent there (an LRU bounded
by that replica's KV blocks: it cannot hold more), and a prompt whose leading blocks mostly match a
replica's goes there, unless that replica is already much busier than the least loaded one. What a replica
evicted is not known here, so the memory is a guess, as SGLang's approximate tree is.

Plain Python, no torch: tested in milliseconds.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Sequence

# Only the first blocks of a prompt are remembered: a shared system prompt or document sits at the start.
MAX_HASHED_BLOCKS = 64
# A prompt prefers the replica holding its prefix when at least this share of its tokens is cached there
# (SGLang's cache_threshold): a common chat header alone does not pull every request onto one replica.
MIN_CACHED_SHARE = 0.5
# ...unless that replica has this many more sequences than the least loaded one: past it, queueing behind
# them costs more than recomputing the prefix (SGLang's balance_abs_threshold, scaled to CPU batch sizes).
MAX_EXTRA_LOAD = 8


def prefix_hashes(token_ids: Sequence[int], block_size: int, max_blocks: int = MAX_HASHED_BLOCKS) -> list[int]:
    """Chained hashes of the prompt's first full blocks: each names its block and every block before it."""
    hashes: list[int] = []
    previous = 0
    for start in range(0, min(len(token_ids) // block_size, max_blocks) * block_size, block_size):
        previous = hash((previous, tuple(token_ids[start:start + block_size])))
        hashes.append(previous)
    return hashes


class Router:
    def __init__(self, capacities: Sequence[int], block_size: int) -> None:
        """`capacities`: each replica's KV cache blocks (how many block hashes it may be remembered for)."""
        self.block_size = block_size
        self.loads = [0] * len(capacities)
        self._capacities = list(capacities)
        self._cached: list[OrderedDict[int, None]] = [OrderedDict() for _ in capacities]
        self._assigned: dict[str, tuple[int, int]] = {}   # request id -> (replica, its load)
        # NOTE: requests are routed on the event loop and finish on the replicas' reader threads
        self._lock = threading.Lock()
        self.num_affinity_hits = 0   # requests sent to a replica for its cached prefix
        # Equally loaded replicas take turns: requests one at a time still use (and cache on) all of them.
        self._next = 0

    def route(self, request_id: str, token_ids: Sequence[int], load: int = 1) -> int:
        """The replica for a request of `load` sequences (counted there until `release`)."""
        hashes = prefix_hashes(token_ids, self.block_size)
        with self._lock:
            num_replicas = len(self.loads)
            least = min(range(num_replicas),
                        key=lambda index: (self.loads[index], (index - self._next) % num_replicas))
            chosen = least
            matched = [self._num_matched(index, hashes) for index in range(num_replicas)]
            best = max(range(num_replicas), key=lambda index: (matched[index], -self.loads[index]))
            cached_share = matched[best] * self.block_size / max(len(token_ids), 1)
            if (matched[best] and cached_share >= MIN_CACHED_SHARE
                    and self.loads[best] - self.loads[least] <= MAX_EXTRA_LOAD):
                chosen = best
                self.num_affinity_hits += best != least
            self._next = (chosen + 1) % num_replicas
            self._remember(chosen, hashes)
            self.loads[chosen] += load
            self._assigned[request_id] = (chosen, load)
            return chosen

    def release(self, request_id: str) -> int | None:
        """The request finished or was aborted: its replica (None if not routed, or released already)."""
        with self._lock:
            assigned = self._assigned.pop(request_id, None)
            if assigned is None:
                return None
            replica, load = assigned
            self.loads[replica] -= load
            return replica

    def replica_of(self, request_id: str) -> int | None:
        with self._lock:
            assigned = self._assigned.get(request_id)
            return None if assigned is None else assigned[0]

    def _num_matched(self, replica: int, hashes: list[int]) -> int:
        cached = self._cached[replica]
        for count, block_hash in enumerate(hashes):
            if block_hash not in cached:
                return count
        return len(hashes)

    def _remember(self, replica: int, hashes: list[int]) -> None:
        cached = self._cached[replica]
        for block_hash in hashes:
            cached[block_hash] = None
            cached.move_to_end(block_hash)
        while len(cached) > self._capacities[replica]:
            cached.popitem(last=False)
