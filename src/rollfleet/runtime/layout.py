"""Dedicated or colocated, decided once from the spec: where the engines run, who sends weights how,
which engines a trainer rank's rollouts use, and what a rank does before it trains."""

from __future__ import annotations

from typing import Any

from rollfleet.runtime import placement
from rollfleet.spec import FleetSpec, runtime_config

ENGINE_RESTARTS = -1  # Ray restarts a killed engine in its bundle without limit: the supervisor's budget governs


class Dedicated:
    """Engines on the inference pool, each in its own placement group; rank 0 broadcasts to all."""

    colocated = False

    def place_engines(self, spec: FleetSpec, model: str, trainers: Any) -> tuple[list[Any], list[Any]]:
        """The engine actors (not started) and the placement groups this layout reserved for them."""
        import ray

        from rollfleet.runtime.engine import EngineActor

        groups = placement.reserve_engines(spec, spec.timeouts.init_seconds)
        actor = ray.remote(EngineActor)
        config = runtime_config(spec)
        engines = [actor.options(**placement.engine_options(spec, g), max_restarts=ENGINE_RESTARTS).remote(
            config, i, model) for i, g in enumerate(groups)]
        return engines, groups

    def sender(self, fleet: Any, rank: int, device: Any) -> Any:
        """Rank 0 forms the sync group with every engine worker; the other ranks send nothing."""
        from rollfleet.runtime.sender import WeightSender

        return WeightSender(fleet, device) if rank == 0 else None

    def engines_of(self, rank: int) -> list[int] | None:
        return None  # every engine

    def release(self, fleet: Any, rank: int) -> None:
        """Nothing shares the rank's GPU."""


class Colocated:
    """Engine i in the placement bundle of trainer rank i, on its GPU; each rank hands its weights to
    its own engine through CUDA IPC, and that engine sleeps while the rank trains."""

    colocated = True

    def place_engines(self, spec: FleetSpec, model: str, trainers: Any) -> tuple[list[Any], list[Any]]:
        import ray

        from rollfleet.runtime.engine import EngineActor

        if trainers is None:
            raise ValueError("the colocated layout starts its engines next to a started TrainerGroup")
        per_node = spec.trainer_pool.gpus_per_node
        actor = ray.remote(EngineActor)
        config = runtime_config(spec)
        engines = [actor.options(**placement.colocated_engine_options(spec, trainers.groups[i // per_node],
                                                                      i % per_node),
                                 max_restarts=ENGINE_RESTARTS).remote(config, i, model, trainers.infos[i]["gpus"])
                   for i in range(spec.engines)]
        return engines, []  # the trainer group owns the placement groups

    def sender(self, fleet: Any, rank: int, device: Any) -> Any:
        from rollfleet.runtime.ipc import IpcSender

        return IpcSender(fleet, rank, device or "cpu")

    def engines_of(self, rank: int) -> list[int] | None:
        """The engine on the rank's GPU (another one serves the rank while its own is being replaced)."""
        return [rank]

    def release(self, fleet: Any, rank: int) -> None:
        """Before the rank trains: the engine on its GPU drains or interrupts its requests and sleeps
        (vLLM sleep level 2), so training gets the memory; the next push wakes it."""
        import ray

        ray.get(fleet.engines[rank].sleep.remote(), timeout=fleet.timeouts.health.outer)


def layout_of(spec: FleetSpec) -> Dedicated | Colocated:
    return Colocated() if spec.colocated else Dedicated()
