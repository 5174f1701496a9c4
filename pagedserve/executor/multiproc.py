"""Ranks 1..N-1 as processes on this machine (spawned: a fresh interpreter each, no forked torch state)."""
from __future__ import annotations

import logging
import multiprocessing
import sys
from multiprocessing.process import BaseProcess

from pagedserve.executor.collective import SpecFor
from pagedserve.executor.worker import WorkerSpec, run_worker

LOOPBACK = "127.0.0.1"


def _worker_main(spec: WorkerSpec, log_level: int) -> None:
    logging.basicConfig(level=log_level, format=f"%(asctime)s %(levelname)s rank {spec.rank} %(name)s: %(message)s")
    sys.exit(run_worker(spec))


class ProcessLauncher:
    def __init__(self) -> None:
        self.processes: list[BaseProcess] = []

    def driver_ip(self) -> str:
        return LOOPBACK

    def start(self, world_size: int, spec_for: SpecFor) -> int:
        context = multiprocessing.get_context("spawn")
        level = logging.getLogger("pagedserve").getEffectiveLevel()
        for rank in range(1, world_size):
            # NOTE: daemonic, so a driver that exits takes its workers with it.
            process = context.Process(target=_worker_main, args=(spec_for(rank, rank, world_size, LOOPBACK), level),
                                      name=f"pagedserve-rank-{rank}", daemon=True)
            process.start()
            self.processes.append(process)
        return world_size

    def failures(self) -> list[str]:
        return [f"rank {rank} (pid {process.pid}) exited with status {process.exitcode}"
                for rank, process in enumerate(self.processes, start=1) if process.exitcode is not None]

    def stop(self, timeout_seconds: float) -> None:
        for process in self.processes:
            process.join(timeout_seconds)
            if process.is_alive():
                process.kill()
                process.join()
