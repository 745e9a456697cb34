"""Placement: one placement group per engine on the inference pool; trainers on the trainer pool.

Pools are Ray custom resources set per worker group in the RayCluster (`inference: <gpusPerNode>`,
`trainer: <gpusPerNode>`), so an engine can never land on a trainer GPU and vice versa.
"""

from __future__ import annotations

import uuid
from typing import Any

from rollfleet.spec import FleetSpec


class PlacementTimeout(RuntimeError):
    pass


def actor_env(spec: FleetSpec) -> dict[str, Any]:
    """Identical env (the seed's + ncclEnv) for engines and trainers: NCCL must match on both sides."""
    return {"env_vars": {**spec.env, **spec.nccl_env}}


def engine_bundle(spec: FleetSpec) -> dict[str, float]:
    tp = spec.vllm.tensor_parallel_size
    if spec.engine == "vllm":
        return {"GPU": tp, "CPU": 1, "inference": tp}
    return {"CPU": 1, "inference": 1}  # the CPU stand-in: one inference slot per engine


def trainer_options(spec: FleetSpec) -> dict[str, Any]:
    gpu = spec.engine == "vllm"
    return {"num_gpus": 1 if gpu else 0, "num_cpus": 1, "resources": {"trainer": 1},
            "runtime_env": actor_env(spec)}


def reserve_engines(spec: FleetSpec, timeout_s: float) -> list[Any]:
    """One STRICT_PACK placement group per engine; waits up to `timeout_s` for all of them."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundle = engine_bundle(spec)
    # names are unique per job namespace: a suffix lets a second fleet (or a restart) reserve its own
    suffix = uuid.uuid4().hex[:8]
    groups = [placement_group([bundle], strategy="STRICT_PACK", name=f"{spec.name}-engine-{i}-{suffix}")
              for i in range(spec.engines)]
    ready, _ = ray.wait([g.ready() for g in groups], num_returns=len(groups), timeout=timeout_s)
    if len(ready) < len(groups):
        for g in groups:
            remove_placement_group(g)
        need = {k: v * len(groups) for k, v in bundle.items()}
        raise PlacementTimeout(
            f"placement: {len(ready)}/{len(groups)} engine placement groups ready after {timeout_s:g} s "
            f"(timeouts.initSeconds); requested {need} in bundles of {bundle}, the cluster has "
            f"{_fmt(ray.cluster_resources())} of which {_fmt(ray.available_resources())} are free. "
            f"Check that the inference pool registered its GPUs and the `inference` resource.")
    return groups


def engine_options(spec: FleetSpec, group: Any) -> dict[str, Any]:
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    bundle = engine_bundle(spec)
    return {
        "num_gpus": bundle.get("GPU", 0), "num_cpus": bundle["CPU"], "resources": {"inference": bundle["inference"]},
        "max_concurrency": 4,  # generate/receive serialize on the engine lock; health never waits
        "runtime_env": actor_env(spec),
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            placement_group=group, placement_group_bundle_index=0, placement_group_capture_child_tasks=True),
    }


def _fmt(resources: dict[str, float]) -> str:
    keep = {k: v for k, v in resources.items() if k in ("CPU", "GPU", "trainer", "inference")}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(keep.items())) + "}"
