"""Each rank on a machine gets its own cores: a share of what this process may use (its affinity mask and
the container's CPU quota), pinned, like vLLM's VLLM_CPU_OMP_THREADS_BIND."""
from __future__ import annotations

import os

from pagedserve.config import EngineConfig
from pagedserve.engine.host_limits import default_num_threads


def rank_config(config: EngineConfig, local_rank: int, num_local_ranks: int) -> EngineConfig:
    """`config` as the rank `local_rank` of `num_local_ranks` on one machine runs it.

    --cpu-threads-bind 0-3|4-7 gives each local rank its part; auto (the default) splits the usable cores
    evenly and pins each rank to its share; all / nobind pins nothing and gives each rank its share of
    the thread count. --num-threads, when given, is each rank's thread count."""
    bind = (config.cpu_threads_bind or "auto").strip().lower()
    if "|" in bind:
        parts = bind.split("|")
        return config.replace(cpu_threads_bind=parts[local_rank % len(parts)])
    usable = max(1, default_num_threads())
    share = max(1, usable // num_local_ranks)
    if bind in ("all", "nobind"):
        return config.replace(num_threads=config.num_threads or share)
    if bind != "auto":
        return config   # one explicit list: every rank on it
    allowed = sorted(os.sched_getaffinity(0))[:usable]
    first = (local_rank * share) % len(allowed)
    cores = [allowed[(first + index) % len(allowed)] for index in range(min(share, len(allowed)))]
    return config.replace(cpu_threads_bind=",".join(map(str, cores)), num_threads=config.num_threads or len(cores))
