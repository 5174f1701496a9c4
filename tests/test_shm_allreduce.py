"""The shared-memory collectives of a tensor-parallel group on one machine (distributed/shm.py, the C++
ShmCommunicator): the sums and gathers torch.distributed's gloo gives, for odd sizes and sizes that take
several rounds, float32 and bfloat16, two and three ranks and one group per pipeline stage; gloo again when
turned off; and a peer that dies or never comes is an error, never a hang.

Each case runs real ranks: processes joined by init_model_parallel, as the executor's workers are.
"""
from __future__ import annotations

import multiprocessing
import os
import socket
import traceback

import pytest
import torch

# 600,001 float32 values take three 1 MiB rounds (two as bfloat16); 1 and 17 are smaller than a SIMD block.
SIZES = (1, 17, 4099, 600_001)
GATHER_SHAPES = ((3, 5), (2, 300_007))   # the second: rows split across rounds
RESULT_TIMEOUT_SECONDS = 300             # a bound on each rank's answer, so a hang fails the test


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _input(global_rank: int, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1000 * global_rank + shape[-1])
    return (torch.randn(shape, generator=generator) * (global_rank + 1)).to(dtype)


def _check_collectives(rank: int, port: int, tp_size: int, pp_size: int, use_shared_memory: bool, results) -> None:
    try:
        import torch.distributed as dist

        from pagedserve.distributed import init_model_parallel

        torch.set_num_threads(1)
        parallel = init_model_parallel(rank, tp_size, pp_size, pp_size, f"tcp://127.0.0.1:{port}", 120,
                                       use_shared_memory=use_shared_memory)
        tp = parallel.tp
        assert (tp.shm is not None) == use_shared_memory, tp.shm
        group_ranks = [parallel.stage.global_rank(parallel.stage.rank, r) for r in range(tp_size)]
        for dtype in (torch.float32, torch.bfloat16):
            for numel in SIZES:
                inputs = [_input(r, (numel,), dtype) for r in group_ranks]
                ours = tp.all_reduce(inputs[tp.rank].clone())
                if tp_size == 2:   # one addition: one rounding, whoever does it
                    gloo = inputs[tp.rank].clone()
                    dist.all_reduce(gloo, group=tp.group)
                    assert torch.equal(ours, gloo), (dtype, numel)
                else:
                    # gloo adds three terms in an order of its own, rounding bfloat16 after each addition;
                    # against its float32 sum, ours is within the rounding of its own dtype
                    gloo = inputs[tp.rank].to(torch.float32, copy=True)
                    dist.all_reduce(gloo, group=tp.group)
                    torch.testing.assert_close(ours, gloo.to(dtype))
                if use_shared_memory:
                    # in rank order, in float32, rounded once: bitwise the same on every rank
                    expected = inputs[0].float()
                    for other in inputs[1:]:
                        expected = expected + other.float()
                    assert torch.equal(ours, expected.to(dtype)), (dtype, numel)
        counts = torch.tensor([tp.rank + 1, 7], dtype=torch.int64)   # not a float: goes over gloo
        assert tp.all_reduce(counts).tolist() == [tp_size * (tp_size + 1) // 2, 7 * tp_size]
        for shape in GATHER_SHAPES:
            parts = [_input(r, shape, torch.float32) for r in group_ranks]
            assert torch.equal(tp.all_gather(parts[tp.rank]), torch.cat(parts, dim=-1)), shape
        results.put((rank, None))
    except BaseException:
        results.put((rank, traceback.format_exc()))


def _run_ranks(target, world_size: int, *args) -> dict[int, object]:
    """Start `world_size` ranks of `target(rank, port, *args, results)`; each rank's answer."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    processes = [context.Process(target=target, args=(rank, port, *args, results), daemon=True)
                 for rank in range(world_size)]
    for process in processes:
        process.start()
    try:
        answers = dict(results.get(timeout=RESULT_TIMEOUT_SECONDS) for _ in processes)
    finally:
        for process in processes:
            process.join(30)
            if process.is_alive():
                process.kill()
                process.join()
    return answers


@pytest.mark.parametrize("tp_size, pp_size, use_shared_memory", [(2, 1, True), (3, 1, True), (2, 2, True),
                                                                 (2, 1, False)],
                         ids=["tp2", "tp3", "tp2xpp2", "tp2-gloo"])
def test_collectives_match_gloo(tp_size, pp_size, use_shared_memory):
    answers = _run_ranks(_check_collectives, tp_size * pp_size, tp_size, pp_size, use_shared_memory)
    assert answers == {rank: None for rank in range(tp_size * pp_size)}, "\n".join(map(str, answers.values()))


def _dead_or_late_peer(rank: int, port: int, case: str, release, results) -> None:
    """Rank 1 never all-reduces: it exits as rank 0 starts one (`dead`), or only after rank 0 has given up
    (`late`); rank 0 reports what its all-reduce raised, and what the next one raises."""
    try:
        from pagedserve.distributed import init_model_parallel
        from pagedserve.distributed.shm import join_shared_memory

        parallel = init_model_parallel(rank, 2, 1, 1, f"tcp://127.0.0.1:{port}", 120, use_shared_memory=False)
        # a short bound for the late peer; the dead one must be noticed well before this one
        timeout_seconds = 2 if case == "late" else 120
        shm = join_shared_memory(parallel.tp.group, [0, 1], rank, timeout_seconds)
        assert shm is not None
        if rank == 1:
            release.wait()
            results.put((rank, None))
            results.close()
            results.join_thread()
            os._exit(0)
        if case == "dead":
            release.set()   # only now: rank 1 must not leave while the ranks still talk over gloo
        errors = []
        for _ in range(2):
            try:
                shm.all_reduce(torch.ones(640))
                errors.append(None)
            except RuntimeError as error:
                errors.append(str(error))
        release.set()
        results.put((rank, errors))
        results.close()
        results.join_thread()
        os._exit(0)   # the peer may be gone: no goodbye over gloo
    except BaseException:
        results.put((rank, traceback.format_exc()))


@pytest.mark.parametrize("case, message", [("dead", "rank 1 of the tensor-parallel group has exited"),
                                           ("late", "waited 2 s for rank 1 of the tensor-parallel group")])
def test_a_dead_or_late_peer_is_an_error_not_a_hang(case, message):
    release = multiprocessing.get_context("spawn").Event()
    answers = _run_ranks(_dead_or_late_peer, 2, case, release)
    assert answers[1] is None, answers[1]
    first, second = answers[0]
    assert message in first and "tensor-parallel ranks 0,1" in first
    # the ranks are out of step for good: later collectives fail at once
    assert "an earlier collective of this group failed" in second
