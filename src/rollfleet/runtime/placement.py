"""Placement: one placement group per engine on the inference pool, one per node on the trainer pool.

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


def trainer_bundle(spec: FleetSpec) -> dict[str, float]:
    """One trainer rank's GPU; in the colocated layout its engine shares the bundle (one more CPU)."""
    cpus = 2 if spec.colocated else 1
    return {"GPU": 1, "CPU": cpus, "trainer": 1} if spec.engine == "vllm" else {"CPU": cpus, "trainer": 1}


def _reserve(spec: FleetSpec, bundles: list[list[dict[str, float]]], what: str, timeout_s: float) -> list[Any]:
    """STRICT_PACK placement groups (one per entry of `bundles`); waits up to `timeout_s` for all."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    # names are unique per job namespace: a suffix lets a second fleet (or a restart) reserve its own
    suffix = uuid.uuid4().hex[:8]
    groups = [placement_group(b, strategy="STRICT_PACK", name=f"{spec.name}-{what}-{i}-{suffix}")
              for i, b in enumerate(bundles)]
    ready, _ = ray.wait([g.ready() for g in groups], num_returns=len(groups), timeout=timeout_s)
    if len(ready) < len(groups):
        for g in groups:
            remove_placement_group(g)
        need: dict[str, float] = {}
        for b in (x for group in bundles for x in group):
            for k, v in b.items():
                need[k] = need.get(k, 0) + v
        raise PlacementTimeout(
            f"placement: {len(ready)}/{len(groups)} {what} placement groups ready after {timeout_s:g} s "
            f"(timeouts.initSeconds); requested {need} in groups of {bundles[0]}, the cluster has "
            f"{_fmt(ray.cluster_resources())} of which {_fmt(ray.available_resources())} are free. "
            f"Check that the {'inference' if what == 'engine' else 'trainer'} pool registered its GPUs and "
            f"its `{'inference' if what == 'engine' else 'trainer'}` resource.")
    return groups


def reserve_engines(spec: FleetSpec, timeout_s: float) -> list[Any]:
    """One placement group per engine (TP GPUs of one node)."""
    return _reserve(spec, [[engine_bundle(spec)]] * spec.engines, "engine", timeout_s)


def reserve_trainers(spec: FleetSpec, timeout_s: float) -> list[Any]:
    """One placement group per trainer node, a bundle per GPU: ranks go node by node."""
    pool = spec.trainer_pool
    return _reserve(spec, [[trainer_bundle(spec)] * pool.gpus_per_node] * pool.nodes, "trainer", timeout_s)


def _in(group: Any, bundle: int) -> Any:
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    return PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=bundle,
                                            placement_group_capture_child_tasks=True)


def engine_options(spec: FleetSpec, group: Any) -> dict[str, Any]:
    bundle = engine_bundle(spec)
    return {
        "num_gpus": bundle.get("GPU", 0), "num_cpus": bundle["CPU"], "resources": {"inference": bundle["inference"]},
        "max_concurrency": 32,  # submit / poll (one per client) / receive / health ... never queue behind each other
        "runtime_env": actor_env(spec), "scheduling_strategy": _in(group, 0),
    }


def colocated_engine_options(spec: FleetSpec, group: Any, bundle: int) -> dict[str, Any]:
    """An engine in the bundle of the trainer rank it shares a GPU with. It asks Ray for no GPU (the rank
    holds it); EngineActor makes that GPU visible itself (its `devices` argument)."""
    return {"num_gpus": 0, "num_cpus": 1, "max_concurrency": 32, "runtime_env": actor_env(spec),
            "scheduling_strategy": _in(group, bundle)}


def trainer_options(spec: FleetSpec, group: Any, bundle: int) -> dict[str, Any]:
    b = trainer_bundle(spec)  # (its second CPU, in the colocated layout, is the engine's)
    return {"num_gpus": b.get("GPU", 0), "num_cpus": 1, "resources": {"trainer": 1},
            "runtime_env": actor_env(spec), "scheduling_strategy": _in(group, bundle)}


def _fmt(resources: dict[str, float]) -> str:
    keep = {k: v for k, v in resources.items() if k in ("CPU", "GPU", "trainer", "inference")}
    return "{" + ", ".join(f"{k}: {v:g}" for k, v in sorted(keep.items())) + "}"
