"""The public runtime API for trainers.

```python
fleet = Fleet.start(spec)                      # engines + their supervisor; waits timeouts.initSeconds
rollouts = fleet.rollouts()                    # asynchronous: submit / results / take (rollout.py)
completions = fleet.generate(prompts, params)  # blocking, in prompt order
sender = fleet.sender()                        # inside trainer rank 0: forms the sync group
stats = sender.push(model.named_parameters())  # streamed bucketed broadcast, load, prefix reset, checksums
fleet.health()                                 # every engine's state, a dead one as dead; never waits on work
```
A Fleet holds only the spec and actor handles (the engines, their supervisor), so it can be passed to
trainer actors. The supervisor (supervisor.py) owns each engine's state and replaces dead ones; every
Fleet reads its roster.
"""

from __future__ import annotations

import time
from typing import Any, Callable, Iterable

from rollfleet.runtime import tiny
from rollfleet.runtime.calls import describe, gather
from rollfleet.runtime.layout import layout_of
from rollfleet.runtime.rollout import Completion, Rollouts, as_request
from rollfleet.runtime.supervisor import FleetFailed, Roster, Supervisor
from rollfleet.runtime.timeouts import Timeouts
from rollfleet.spec import FleetSpec, load_spec, runtime_config

HEALTH_PROBE_SECONDS = 5.0  # after a failed push: an engine that does not answer health in this long froze


class Fleet:
    def __init__(self, spec: FleetSpec, engines: list[Any], groups: list[Any], supervisor: Any = None,
                 vocab_size: int | None = None):
        """`supervisor`: its actor handle; None: an unsupervised fleet (benchmark sinks, tests), every
        engine a member and nothing restarted."""
        self.spec, self.engines, self.groups = spec, engines, groups
        self.supervisor, self.vocab_size = supervisor, vocab_size
        self.layout = layout_of(spec)
        self.timeouts = Timeouts.of(spec)
        self._static = Roster(len(engines)) if supervisor is None else None

    @classmethod
    def start(cls, spec: FleetSpec, model: str | None = None, trainers: Any = None) -> Fleet:
        """Start the engines and their supervisor, waiting up to timeouts.initSeconds in all: one
        placement group per engine on the inference pool, or (colocated) engine i in the bundle of
        trainer rank i of `trainers` (a started TrainerGroup), on its GPU. An engine that dies while it
        starts is started again (within recovery.maxRestarts)."""
        import ray

        t = Timeouts.of(spec).init
        model = model or tiny.resolve(spec.model.name)
        layout = layout_of(spec)
        print(f"[rollfleet] waiting up to {t.within} for {spec.engines} {spec.engine} engine(s) × TP "
              f"{spec.vllm.tensor_parallel_size}" + (", each on a trainer rank's GPU (colocated)"
                                                     if layout.colocated else ""), flush=True)
        engines, groups = layout.place_engines(spec, model, trainers)
        supervisor = ray.remote(Supervisor).options(max_concurrency=16, num_cpus=0).remote(
            runtime_config(spec), engines)
        fleet = cls(spec, engines, groups, supervisor)
        try:
            infos = ray.get(supervisor.start_all.remote(), timeout=t.outer + 30)
        except BaseException as exc:
            fleet.shutdown()
            if isinstance(exc, ray.exceptions.GetTimeoutError):
                raise t.error("engine start") from None
            if isinstance(exc, ray.exceptions.RayTaskError):
                cause = exc.cause
                raise (cause if isinstance(cause, (FleetFailed, TimeoutError)) else
                       FleetFailed(describe(exc).removeprefix("EngineStartError: "))) from None
            raise
        fleet.vocab_size = min(i["vocab_size"] for i in infos if i)
        for info in infos:
            if info:
                print(f"[rollfleet] engine {info['engine']} ready: {info['kind']} on {info['node']} "
                      f"gpus={info['gpus']}", flush=True)
        return fleet

    # ---- the roster (the supervisor's view) -------------------------------------------------------

    def roster(self) -> dict[str, Any]:
        """Each engine's state (healthy, suspect, dead, restarting, stale, failed), the fleet's version."""
        import ray

        if self._static is not None:
            return self._static.roster()
        return ray.get(self.supervisor.roster.remote(), timeout=self.timeouts.health.seconds)

    @property
    def version(self) -> int:
        """The newest weight version a push completed on: versions only increase for the fleet's life."""
        return self.roster()["version"]

    def _tell(self, method: str, *args: Any) -> None:
        if self._static is not None:
            getattr(self._static, method)(*args)
        else:
            getattr(self.supervisor, method).remote(*args)

    def report(self, engine: int, incarnation: str | None, reason: str) -> None:
        """A real call failed because engine `engine`'s process is gone. Waited for (the supervisor is a
        threaded actor: a `settle` sent next could otherwise run first, see the engine still healthy, and
        a rendezvous re-form without it), at most recovery.probeTimeoutSeconds: a supervisor that does not
        answer by then notices by its own probes."""
        import ray

        if self._static is not None:
            return self._static.report(engine, incarnation, reason)
        try:
            ray.get(self.supervisor.report.remote(engine, incarnation, reason),
                    timeout=self.spec.recovery.probe_timeout_seconds)
        except (ray.exceptions.GetTimeoutError, ray.exceptions.RayActorError):
            pass

    def synced(self, version: int, members: list[tuple[int, str | None]]) -> None:
        import ray

        if self._static is not None:
            return self._static.synced(version, members)
        ray.get(self.supervisor.synced.remote(version, list(members)), timeout=self.timeouts.health.seconds)

    def unsynced(self, members: list[tuple[int, str | None]], reason: str) -> None:
        self._tell("unsynced", list(members), reason)

    def settle(self, timeout_s: float) -> dict[str, Any]:
        """The roster once no engine is dead or restarting (or the fleet failed), at most `timeout_s`."""
        import ray

        if self._static is not None:
            return self._static.roster()
        return ray.get(self.supervisor.settle.remote(timeout_s), timeout=timeout_s + self.timeouts.health.seconds)

    def events(self, since: int = 0) -> list[dict[str, Any]]:
        """The supervisor's transitions (time, engine, state, what) from the `since`-th on."""
        import ray

        if self._static is not None:
            return []
        return ray.get(self.supervisor.events_since.remote(since), timeout=self.timeouts.health.seconds)

    # ---- rollouts ---------------------------------------------------------------------------------

    def rollouts(self, engines: list[int] | None = None, fallback: bool = False,
                 on_stall: Callable[[], None] | None = None) -> Rollouts:
        """A new rollout client (its own queue on each engine; all engines, or the ones given, and with
        `fallback` any serving one while those do not serve): submit, results, take."""
        return Rollouts(self, engines, fallback, on_stall)

    def generate(self, prompts: Iterable[Any], params: dict[str, Any] | None = None,
                 timeout_s: float | None = None, engines: list[int] | None = None) -> list[Completion]:
        """Blocking: one Completion per prompt, in order. A prompt is text, token ids, chat messages
        or a Request; `params` are the sampling params of the non-Request ones."""
        with self.rollouts(engines, fallback=engines is not None) as client:
            return client.generate([as_request(p, params) for p in prompts], timeout_s)

    def sender(self, device: Any = None, rank: int = 0) -> Any:
        """Call inside trainer rank 0: forms the sync group with every engine worker. Colocated: every
        rank calls it and gets the handoff to the engine on its own GPU (ipc.IpcSender)."""
        return self.layout.sender(self, rank, device)

    # ---- health -----------------------------------------------------------------------------------

    def health(self, timeout_s: float | None = None) -> list[dict[str, Any]]:
        """Every engine's own state and weight version beside the supervisor's view (`fleet_state`); an
        engine that died or does not answer within `timeout_s` (timeouts.healthSeconds) is reported
        as such, never raised."""
        import ray

        t = self.timeouts.health.seconds if timeout_s is None else timeout_s
        refs = [e.health.remote() for e in self.engines]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=t)
        states = self.roster()["engines"]
        out = []
        for i, ref in enumerate(refs):
            fleet_state = states[i]["state"]
            if ref not in ready:
                out.append({"engine": i, "state": "unresponsive", "fleet_state": fleet_state,
                            "last_error": f"health did not answer within {t:g} s", "weight_version": None})
                continue
            try:
                out.append({**ray.get(ref), "fleet_state": fleet_state})
            except Exception as exc:
                out.append({"engine": i, "state": "dead", "fleet_state": fleet_state, "last_error": describe(exc),
                            "weight_version": None})
        return out

    def unresponsive(self, engines: list[int] | None = None, timeout_s: float = HEALTH_PROBE_SECONDS) -> list[str]:
        """Of `engines` (default all): those that died or do not answer health within `timeout_s`
        (frozen), one line each."""
        indices = list(range(len(self.engines))) if engines is None else list(engines)
        by_index = {h["engine"]: h for h in self.health(timeout_s)}
        out = []
        for i in indices:
            h = by_index[i]
            if h["state"] == "unresponsive":
                out.append(f"engine {i} stopped responding (health did not answer within {timeout_s:g} s)")
            elif h["state"] == "dead":
                out.append(f"engine {i} died ({h['last_error']})")
        return out

    def call(self, fn: Callable, *args: Any) -> list[list[Any]]:
        """`fn(worker, *args)` in every worker of every engine (benchmarks and tests)."""
        t = self.timeouts.sync
        return gather([e.call.remote(fn, *args) for e in self.engines], t.deadline(), "call", t.within)

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        if self.supervisor is not None:
            ray.wait([self.supervisor.stop.remote()], timeout=5)
        stops = [e.stop.remote() for e in self.engines]
        ray.wait(stops, num_returns=len(stops), timeout=60)  # graceful first: GPU memory is returned
        for e in self.engines:
            ray.kill(e, no_restart=True)
        if self.supervisor is not None:
            ray.kill(self.supervisor)
        for g in self.groups:
            remove_placement_group(g)

    def __reduce__(self):  # ship spec + handles to trainer actors
        return (_rebuild, (runtime_config(self.spec), self.engines, self.groups, self.supervisor, self.vocab_size))


def _rebuild(config, engines, groups, supervisor, vocab_size) -> Fleet:
    return Fleet(load_spec(config), engines, groups, supervisor, vocab_size)
