"""The public runtime API for trainers.

```python
fleet = Fleet.start(spec)                      # placement groups + engines; waits timeouts.initSeconds
outs = fleet.generate(prompts, {"n": 4, "temperature": 1.0, "max_tokens": 256})
sender = fleet.sender()                        # inside trainer rank 0: joins the sync group as rank 0
stats = sender.push(model.named_parameters())  # bucketed broadcast, load, prefix reset, checksums
fleet.health()                                 # answers even while a push or generate is in flight
```
A Fleet holds only the spec and actor handles, so it can be passed to a trainer actor.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Iterable

from rollfleet.runtime import placement, sync, tiny
from rollfleet.runtime.engine import EngineActor
from rollfleet.spec import FleetSpec, load_spec, runtime_config


@dataclasses.dataclass(frozen=True)
class Output:
    prompt_index: int
    sample_index: int
    text: str
    token_ids: list[int]
    weight_version: int
    engine: int


@dataclasses.dataclass(frozen=True)
class PushStats:
    version: int
    bytes: int
    buckets: int
    seconds: float
    engines: int
    checksums_ok: bool | None  # None when sync.verifyChecksums is off
    send_seconds: float = 0.0  # rank 0's data path: pack + broadcast until the last bucket left
    profile: tuple = ()  # per engine: worker / receive RPC / reset seconds

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9


def _describe(exc: BaseException) -> str:
    """The root cause of a Ray error, one line."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"[:500]


def gather(futures: list[Any], deadline: float, what: str, setting: str) -> list[Any]:
    """ray.get with a deadline; an error names the engine (index = position) and the setting to raise."""
    import ray

    index = {f: i for i, f in enumerate(futures)}
    results: dict[int, Any] = {}
    pending = list(futures)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=max(deadline - time.monotonic(), 0))
        if not ready:
            names = ", ".join(f"engine {index[f]}" for f in pending)
            raise TimeoutError(f"{what}: {names} did not answer within {setting}; raise it or check those "
                               f"engines' logs")
        for f in ready:
            try:
                results[index[f]] = ray.get(f)
            except Exception as exc:
                raise sync.SyncError(f"{what}: engine {index[f]} failed: {_describe(exc)}") from None
    return [results[i] for i in range(len(futures))]


def first_failure(futures: list[Any]) -> str | None:
    import ray

    done, _ = ray.wait(list(futures), num_returns=len(futures), timeout=0)
    for i, f in enumerate(futures):
        if f in done:
            try:
                ray.get(f)
            except Exception as exc:
                return f"engine {i}: {_describe(exc)}"
    return None


class Fleet:
    def __init__(self, spec: FleetSpec, engines: list[Any], groups: list[Any]):
        self.spec, self.engines, self.groups = spec, engines, groups

    @classmethod
    def start(cls, spec: FleetSpec, model: str | None = None) -> Fleet:
        """Reserve one placement group per engine on the inference pool and start the engines,
        waiting up to timeouts.initSeconds in all."""
        import ray

        deadline = time.monotonic() + spec.timeouts.init_seconds
        model = model or tiny.resolve(spec.model.name)
        print(f"[rollfleet] waiting up to {spec.timeouts.init_seconds} s (timeouts.initSeconds) for "
              f"{spec.engines} {spec.engine} engine(s) × TP {spec.vllm.tensor_parallel_size}", flush=True)
        groups = placement.reserve_engines(spec, spec.timeouts.init_seconds)
        actor = ray.remote(EngineActor)
        config = runtime_config(spec)
        engines = [actor.options(name=None, **placement.engine_options(spec, g)).remote(config, i, model)
                   for i, g in enumerate(groups)]
        fleet = cls(spec, engines, groups)
        try:
            infos = gather([e.start.remote() for e in engines], deadline, "engine start",
                           f"timeouts.initSeconds={spec.timeouts.init_seconds}")
        except BaseException:
            fleet.shutdown()
            raise
        for info in infos:
            print(f"[rollfleet] engine {info['engine']} ready: {info['kind']} on {info['node']} "
                  f"gpus={info['gpus']}", flush=True)
        return fleet

    def generate(self, prompts: list[str], params: dict[str, Any] | None = None,
                 timeout_s: float | None = None) -> list[Output]:
        """Spread prompts over the engines in contiguous chunks (keeps prefix locality); every output
        carries the weight version it was generated with."""
        timeout_s = timeout_s or self.spec.timeouts.health_seconds
        k = len(self.engines)
        bounds = [round(i * len(prompts) / k) for i in range(k + 1)]
        calls = [(bounds[i], self.engines[i].generate.remote(prompts[bounds[i]:bounds[i + 1]], params))
                 for i in range(k) if bounds[i] < bounds[i + 1]]
        results = gather([f for _, f in calls], time.monotonic() + timeout_s, "generate",
                         f"timeout_s={timeout_s:g} (default timeouts.healthSeconds)")
        outs = []
        for (start, _), per_prompt in zip(calls, results):
            for j, samples in enumerate(per_prompt):
                outs.extend(Output(start + j, s_i, s["text"], s["token_ids"], s["weight_version"], s["engine"])
                            for s_i, s in enumerate(samples))
        return outs

    def sender(self, device: Any = None) -> WeightSender:
        """Call inside trainer rank 0: forms the sync group with every engine worker."""
        return WeightSender(self, device)

    def health(self) -> list[dict[str, Any]]:
        """Each engine's state and weight version; errors name the engine (timeouts.healthSeconds)."""
        t = self.spec.timeouts.health_seconds
        return gather([e.health.remote() for e in self.engines], time.monotonic() + t, "health",
                      f"timeouts.healthSeconds={t}")

    def param_sums(self, names: list[str]) -> list[list[dict[str, float]]]:
        t = self.spec.sync.timeout_seconds
        return gather([e.param_sums.remote(names) for e in self.engines], time.monotonic() + t, "param sums",
                      f"sync.timeoutSeconds={t}")

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        stops = [e.stop.remote() for e in self.engines]
        ray.wait(stops, num_returns=len(stops), timeout=60)  # graceful first: GPU memory is returned
        for e in self.engines:
            ray.kill(e)
        for g in self.groups:
            remove_placement_group(g)

    def __reduce__(self):  # ship spec + handles to trainer actors
        return (_rebuild, (runtime_config(self.spec), self.engines, self.groups))


def _rebuild(config, engines, groups) -> Fleet:
    return Fleet(load_spec(config), engines, groups)


class WeightSender:
    """Rank 0 of the sync group. `push()` sends one weight version to every engine."""

    def __init__(self, fleet: Fleet, device: Any = None):
        import ray
        import torch

        spec = fleet.spec
        self.fleet, self.version = fleet, 0
        self.timeout_s = spec.sync.timeout_seconds
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if spec.engine == "vllm" else "cpu"
        self.device = torch.device(device)
        host = ray.util.get_node_ip_address()  # the trainer pod's IP, never 0.0.0.0
        world = spec.world_size
        store, port = sync.open_store(host, world, self.timeout_s)
        print(f"[rollfleet] sync group: {spec.sync_backend} world {world} on {host}:{port}; waiting up to "
              f"{self.timeout_s} s (sync.timeoutSeconds) for {spec.engines} engine(s)", flush=True)
        joins = [e.join.remote(host, port, world) for e in fleet.engines]
        deadline = time.monotonic() + self.timeout_s
        sync.wait_joined(store, world, spec.vllm.tensor_parallel_size, self.timeout_s,
                         failed=lambda: first_failure(joins))
        self.transport = sync.with_deadline(
            lambda: sync.make_transport(spec.sync_backend, store, 0, world, self.device, self.timeout_s),
            max(deadline - time.monotonic(), 1), "sync group init on rank 0 (trainer)")
        self.ranks = gather(joins, deadline, "sync group join", f"sync.timeoutSeconds={self.timeout_s}")
        self.store = store  # keeps the rendezvous server alive for the group's lifetime

    def push(self, named_tensors: Iterable[tuple[str, Any]], verify: bool | None = None,
             bucket_mib: int | None = None, load: bool = True) -> PushStats:
        """Bucketed broadcast of HF-named, unsharded tensors to every engine; each engine loads them,
        resets its prefix cache, and its checksums must equal the sender's (`verify`, default
        sync.verifyChecksums)."""
        spec = self.fleet.spec
        items = [(n, t) for n, t in named_tensors]
        self.version += 1
        verify = spec.sync.verify_checksums if verify is None else verify
        plan = sync.plan_buckets(items, (bucket_mib or spec.sync.bucket_mib) << 20, self.version, verify)
        if not load:  # bench profiling only: receivers skip load_weights
            plan = dataclasses.replace(plan, load=False)
        t0 = time.perf_counter()
        deadline = time.monotonic() + self.timeout_s
        acks = [e.receive.remote(plan) for e in self.fleet.engines]
        what = f"push v{self.version}"
        try:
            sent = sync.send(plan, [t for _, t in items], self.transport, deadline, lambda: first_failure(acks))
            send_seconds = time.perf_counter() - t0
        except sync.SyncError as exc:
            # name the engine that broke the group, if Ray already knows
            gather_deadline = time.monotonic() + min(5.0, self.timeout_s)
            while time.monotonic() < gather_deadline and not first_failure(acks):
                time.sleep(0.05)
            culprit = first_failure(acks) or "no engine reported an error"
            raise sync.SyncError(str(exc) if culprit in str(exc) else f"{exc}; {culprit}") from None
        results = gather(acks, deadline, what, f"sync.timeoutSeconds={self.timeout_s}")
        seconds = time.perf_counter() - t0
        ok = None
        if plan.verify:
            for r in results:
                for tp_rank, sums in enumerate(r["checksums"]):
                    if sums != sent:
                        buckets = [k for k, (a, b) in enumerate(zip(sums, sent)) if a != b] or "count"
                        raise sync.SyncError(f"{what}: engine {r['engine']} TP rank {tp_rank} checksum mismatch "
                                             f"in bucket(s) {buckets}; the transport corrupted data")
            ok = True
        profile = tuple({k: round(v, 5) for k, v in r.items() if k.endswith("seconds")} for r in results)
        return PushStats(self.version, plan.total_bytes, len(plan.buckets), seconds, len(results), ok,
                         send_seconds, profile)
