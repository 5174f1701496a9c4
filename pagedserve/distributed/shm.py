"""Collectives over shared memory for the ranks of a tensor-parallel group that share a machine.

gloo carries every collective over TCP, loopback included: for the small [rows, hidden] tensors of a
decode step that costs far more than the sum itself, twice per layer. When every rank of a group can
map one segment in /dev/shm (the C++ ShmCommunicator), the group's all-reduce and all-gather go
through it instead, as vLLM's CPU backend does; a group spread over several hosts (Ray across nodes)
keeps gloo. The ranks of a group decide this together, once, at start-up, so they never disagree.
"""
from __future__ import annotations

import logging
import os
import secrets
import socket
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from pagedserve.kernels import cpu_kernels_available

logger = logging.getLogger(__name__)

# What one rank publishes per round; a larger tensor goes in several rounds. Two banks of one slot per
# rank: 4 MiB of /dev/shm for two ranks, 16 MiB for eight (a container's /dev/shm is often 64 MiB).
SLOT_BYTES = 1 << 20
REDUCIBLE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class SharedMemoryGroup:
    """One tensor-parallel group's segment, as this rank sees it."""

    communicator: Any                # torch.classes.pagedserve.ShmCommunicator
    ranks: tuple[int, ...]           # the group's global ranks, in group order

    def can_reduce(self, x: torch.Tensor) -> bool:
        return x.dtype in REDUCIBLE_DTYPES and x.is_contiguous() and x.device.type == "cpu"

    def all_reduce(self, x: torch.Tensor) -> None:
        """x <- the sum over the group, in rank order (bitwise the same on every rank)."""
        try:
            self.communicator.all_reduce(x=x)
        except RuntimeError as error:
            raise self._failed(error) from error

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's x [..., cols] side by side: [..., group size * cols]."""
        try:
            return self.communicator.all_gather(x=x.contiguous())
        except RuntimeError as error:
            raise self._failed(error) from error

    def _failed(self, error: RuntimeError) -> RuntimeError:
        # the C++ message counts ranks within the group; name the group's ranks as the logs do
        return RuntimeError(f"tensor-parallel ranks {_span(list(self.ranks))}: {str(error).splitlines()[0]}")


def join_shared_memory(group: Any, ranks: list[int], group_rank: int, timeout_seconds: float
                       ) -> SharedMemoryGroup | None:
    """Every rank of `group` calls this once; all get a SharedMemoryGroup, or all get None (use gloo).

    Rank 0 of the group makes the segment and sends its name over gloo; each rank tries to map it and
    says whether it could; once all have tried, rank 0 removes the name (the mappings stay), so no
    file outlives the ranks whatever happens to them later."""
    communicator, problem = None, None
    box: list[str | None] = [None]
    if group_rank == 0:
        # NOTE: made before its name is sent, so that no rank looks for it before it exists
        name = f"pagedserve-tp-{os.getpid()}-{secrets.token_hex(8)}"
        communicator, problem = _communicator(name, group_rank, len(ranks), timeout_seconds)
        box[0] = name if communicator is not None else None
    dist.broadcast_object_list(box, src=ranks[0], group=group)
    if group_rank != 0:
        if box[0] is None:
            problem = "rank 0 of the group could not make the segment"
        else:
            communicator, problem = _communicator(box[0], group_rank, len(ranks), timeout_seconds)
    reports: list[tuple[str, str | None] | None] = [None] * len(ranks)
    dist.all_gather_object(reports, (_host(), problem), group=group)
    if communicator is not None and group_rank == 0:
        communicator.unlink()
    hosts = sorted({report[0] for report in reports if report is not None})
    failures = [(rank, report[1]) for rank, report in zip(ranks, reports) if report is not None and report[1]]
    if len(hosts) > 1 or failures:
        if group_rank == 0:
            why = f"the ranks are on {len(hosts)} hosts ({', '.join(hosts)})" if len(hosts) > 1 else \
                "; ".join(f"rank {rank}: {problem}" for rank, problem in failures)
            logger.info("tensor-parallel ranks %s: all-reduce over gloo, not shared memory: %s", _span(ranks), why)
        return None
    if group_rank == 0:
        logger.info("tensor-parallel ranks %s (all on %s): all-reduce over shared memory", _span(ranks), hosts[0])
    return SharedMemoryGroup(communicator, tuple(ranks))


def _communicator(name: str, group_rank: int, group_size: int, timeout_seconds: float) -> tuple[Any, str | None]:
    """The segment `name` as this rank maps it (rank 0 makes it), or why it cannot."""
    if not cpu_kernels_available():
        return None, "the C++ kernels could not be loaded"
    try:
        return torch.classes.pagedserve.ShmCommunicator(
            name=name, rank=group_rank, world_size=group_size, slot_bytes=SLOT_BYTES, create=group_rank == 0,
            timeout_seconds=float(timeout_seconds)), None
    except RuntimeError as error:
        return None, str(error).splitlines()[0]


def _host() -> str:
    """What tells hosts apart: the host name, and the network namespace (two namespaces on one machine are
    two hosts to Ray and to the ranks' gloo, even where they could share /dev/shm)."""
    try:
        namespace = os.stat("/proc/self/ns/net").st_ino
    except OSError:
        return socket.gethostname()
    return f"{socket.gethostname()} (net ns {namespace})"


def _span(ranks: list[int]) -> str:
    return ",".join(map(str, ranks))
