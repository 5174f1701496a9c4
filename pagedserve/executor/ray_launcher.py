"""Ranks 1..N-1 as Ray actors, placed by one placement group across the cluster's nodes (as vLLM places
them): bundle 0 is pinned to the driver's node for rank 0, which runs in the engine's process; PACK fills
a node before the next. Start the cluster first (`ray start --head`, then `ray start --address=HEAD:6379`
on the others); with none running, ray.init starts a local one."""
from __future__ import annotations

import logging
from typing import Any

from pagedserve.executor.collective import SpecFor
from pagedserve.executor.worker import WorkerSpec, run_worker

logger = logging.getLogger(__name__)

# How long to wait for the cluster to have room for every rank.
PLACEMENT_TIMEOUT_SECONDS = 120.0


class RankActor:
    """One rank inside a Ray actor process (on whichever node its bundle landed)."""

    def node_ip(self) -> str:
        import ray

        return str(ray.util.get_node_ip_address())

    def run(self, spec: WorkerSpec) -> int:
        logging.basicConfig(level=logging.INFO,
                            format=f"%(asctime)s %(levelname)s rank {spec.rank} %(name)s: %(message)s")
        return run_worker(spec)


class RayLauncher:
    def __init__(self) -> None:
        try:
            import ray
        except ImportError as error:
            raise ValueError("--distributed-executor-backend ray needs Ray: pip install 'pagedserve[ray]'") from error
        self.ray: Any = ray
        ray.init(ignore_reinit_error=True)
        self.actors: list[Any] = []
        self.runs: list[Any] = []
        self.placement_group: Any = None

    def driver_ip(self) -> str:
        return str(self.ray.util.get_node_ip_address())

    def start(self, world_size: int, spec_for: SpecFor) -> int:
        ray = self.ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        driver_ip = self.driver_ip()
        bundles: list[dict[str, float]] = [{"CPU": 1.0} for _ in range(world_size)]
        bundles[0][f"node:{driver_ip}"] = 0.001
        self.placement_group = placement_group(bundles, strategy="PACK")
        ready, _ = ray.wait([self.placement_group.ready()], timeout=PLACEMENT_TIMEOUT_SECONDS)
        if not ready:
            raise RuntimeError(f"the Ray cluster has no room for {world_size} ranks of 1 CPU each (one on this "
                               f"node, {driver_ip}) after {PLACEMENT_TIMEOUT_SECONDS:.0f}s: "
                               f"{ray.available_resources()}")
        actor_class = ray.remote(num_cpus=1)(RankActor)
        for rank in range(1, world_size):
            strategy = PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=rank)
            self.actors.append(actor_class.options(scheduling_strategy=strategy).remote())
        node_ips = [driver_ip, *ray.get([actor.node_ip.remote() for actor in self.actors])]
        local_ranks = [node_ips[:rank].count(ip) for rank, ip in enumerate(node_ips)]
        for rank, actor in enumerate(self.actors, start=1):
            ip = node_ips[rank]
            self.runs.append(actor.run.remote(spec_for(rank, local_ranks[rank], node_ips.count(ip), ip)))
        logger.info("Ray placed %d ranks on nodes %s", world_size, ", ".join(node_ips))
        return node_ips.count(driver_ip)

    def failures(self) -> list[str]:
        ray = self.ray
        done, _ = ray.wait(self.runs, num_returns=len(self.runs), timeout=0)
        lines = []
        for rank, run in enumerate(self.runs, start=1):
            if run in done:
                try:
                    lines.append(f"rank {rank} stopped with status {ray.get(run)}")
                except Exception as error:   # the actor died: Ray says how
                    lines.append(f"rank {rank} died: {type(error).__name__}: {error}")
        return lines

    def stop(self, timeout_seconds: float) -> None:
        ray = self.ray
        if self.runs:
            ray.wait(self.runs, num_returns=len(self.runs), timeout=timeout_seconds)
        for actor in self.actors:
            ray.kill(actor)
        if self.placement_group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.placement_group)
