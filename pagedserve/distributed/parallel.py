"""Which shard of the model this rank holds, and the collectives between shards.

Ranks are laid out as vLLM lays them: rank = pp_rank * tp_size + tp_rank, so the ranks of one pipeline
stage form one tensor-parallel group. A model is built under `model_parallel(layout)`; its parallel layers
read `current_model_parallel()` once, at construction, and keep what they read, so two models in one
process (a single-rank one beside a sharded one) never share a switch.
"""
from __future__ import annotations

import logging
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Iterator

import torch
import torch.distributed as dist

from pagedserve.distributed.shm import SharedMemoryGroup, join_shared_memory

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TensorParallel:
    """This rank's place in its tensor-parallel group; `group` is None for a single rank. `shm`: the group's
    shared-memory segment when all its ranks are on this machine (None: its collectives go over gloo)."""

    rank: int = 0
    size: int = 1
    group: Any = None               # torch.distributed ProcessGroup
    shm: SharedMemoryGroup | None = None

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of x over the group (in place)."""
        if self.size > 1:
            if self.shm is not None and self.shm.can_reduce(x):
                self.shm.all_reduce(x)
            else:
                dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x concatenated along the last dim, in rank order."""
        if self.size == 1:
            return x
        if self.shm is not None:
            return self.shm.all_gather(x)
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)


@dataclass(frozen=True)
class PipelineStage:
    """The decoder layers [start_layer, end_layer) this stage runs; the first stage also holds the token
    embedding and the output head (the driver samples there), the last one the final norm."""

    rank: int = 0
    size: int = 1
    start_layer: int = 0
    end_layer: int | None = None    # None: every layer (a single stage)
    tp_size: int = 1

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.size - 1

    def holds(self, layer_index: int) -> bool:
        return self.start_layer <= layer_index and (self.end_layer is None or layer_index < self.end_layer)

    def global_rank(self, pp_rank: int, tp_rank: int) -> int:
        return pp_rank * self.tp_size + tp_rank


@dataclass(frozen=True)
class ModelParallel:
    tp: TensorParallel = TensorParallel()
    stage: PipelineStage = PipelineStage()
    # every rank, for the driver's messages only (a thread of their own may send on it)
    control_group: Any = None

    @property
    def rank(self) -> int:
        return self.stage.global_rank(self.stage.rank, self.tp.rank)

    @property
    def world_size(self) -> int:
        return self.tp.size * self.stage.size

    def send_to_next(self, x: torch.Tensor) -> None:
        """Hidden states to the same tensor rank of the next stage (the last stage sends to the first)."""
        next_rank = (self.stage.rank + 1) % self.stage.size
        dist.send(x.contiguous(), dst=self.stage.global_rank(next_rank, self.tp.rank))

    def isend_to_next(self, x: torch.Tensor) -> Any:
        """send_to_next without waiting; returns the Work to wait on (x must live until then)."""
        next_rank = (self.stage.rank + 1) % self.stage.size
        return dist.isend(x.contiguous(), dst=self.stage.global_rank(next_rank, self.tp.rank))

    def recv_from_previous(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        previous = (self.stage.rank - 1) % self.stage.size
        x = torch.empty(shape, dtype=dtype)
        dist.recv(x, src=self.stage.global_rank(previous, self.tp.rank))
        return x


def split_layers(num_layers: int, pp_size: int) -> list[tuple[int, int]]:
    """[start, end) of each stage's layers; a remainder goes to the later stages (the first one also
    runs the embedding and the output head)."""
    if num_layers < pp_size:
        raise ValueError(f"pipeline_parallel_size {pp_size} is more than the model's {num_layers} layers")
    base, extra = divmod(num_layers, pp_size)
    sizes = [base + (1 if stage >= pp_size - extra else 0) for stage in range(pp_size)]
    bounds, start = [], 0
    for size in sizes:
        bounds.append((start, start + size))
        start += size
    return bounds


def init_model_parallel(rank: int, tp_size: int, pp_size: int, num_layers: int, init_method: str,
                        timeout_seconds: float, backend: str = "gloo", use_shared_memory: bool = True) -> ModelParallel:
    """Join the world (every rank calls this with the same sizes) and make the tensor-parallel groups.
    gloo on CPU; NCCL would take its place on CUDA with the same calls. `use_shared_memory`: a group whose
    ranks share a machine all-reduces through shared memory (every rank must pass the same value)."""
    world_size = tp_size * pp_size
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_seconds))
    pp_rank, tp_rank = divmod(rank, tp_size)
    group, group_ranks = None, []
    # NOTE: every rank creates every group, in the same order, as new_group requires.
    for stage in range(pp_size):
        ranks = list(range(stage * tp_size, (stage + 1) * tp_size))
        made = dist.new_group(ranks, timeout=timedelta(seconds=timeout_seconds)) if tp_size > 1 else None
        if stage == pp_rank:
            group, group_ranks = made, ranks
    control_group = dist.new_group(list(range(world_size)), timeout=timedelta(seconds=timeout_seconds))
    shm = None
    if tp_size > 1 and use_shared_memory:
        shm = join_shared_memory(group, group_ranks, tp_rank, timeout_seconds)
    elif tp_size > 1 and tp_rank == 0:
        logger.info("tensor-parallel ranks %s: all-reduce over gloo (shared memory turned off)",
                    ",".join(map(str, group_ranks)))
    start, end = split_layers(num_layers, pp_size)[pp_rank]
    return ModelParallel(TensorParallel(tp_rank, tp_size, group, shm),
                         PipelineStage(pp_rank, pp_size, start, end if pp_size > 1 else None, tp_size), control_group)


class _ThreadState(threading.local):
    layout: ModelParallel | None = None


_state = _ThreadState()


@contextmanager
def model_parallel(layout: ModelParallel) -> Iterator[None]:
    """Build a model's layers as this rank's shard of them."""
    previous, _state.layout = _state.layout, layout
    try:
        yield
    finally:
        _state.layout = previous


def current_model_parallel() -> ModelParallel:
    """The layout of the model being built: a single rank holding everything when none is set."""
    return _state.layout or ModelParallel()
