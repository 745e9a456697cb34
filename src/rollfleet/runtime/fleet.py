"""The public runtime API for trainers.

```python
fleet = Fleet.start(spec)                      # placement groups + engines; waits timeouts.initSeconds
rollouts = fleet.rollouts()                    # asynchronous: submit / results / take (rollout.py)
completions = fleet.generate(prompts, params)  # blocking, in prompt order
sender = fleet.sender()                        # inside trainer rank 0: joins the sync group as rank 0
stats = sender.push(model.named_parameters())  # streamed bucketed broadcast, load, prefix reset, checksums
fleet.health()                                 # answers even while a push or generation is in flight
```
A Fleet holds only the spec and actor handles, so it can be passed to trainer actors.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable, Iterable

from rollfleet.runtime import placement, sync, tiny
from rollfleet.runtime.engine import EngineActor
from rollfleet.runtime.rollout import Completion, Request, Rollouts, describe
from rollfleet.spec import FleetSpec, load_spec, runtime_config

HEALTH_PROBE_SECONDS = 5.0  # after a failed push: an engine that does not answer health in this long froze


@dataclasses.dataclass(frozen=True)
class PushStats:
    version: int
    bytes: int
    buckets: int
    tensors: int
    seconds: float
    engines: int
    checksums_ok: bool | None  # None when sync.verifyChecksums is off
    send_seconds: float  # the sender's data path: pack + send until the last bucket left
    profile: tuple = ()  # per engine: drain / receive+reset / paused seconds, in-flight policy
    mode: str = "nccl"  # nccl (a broadcast from rank 0); colocated: direct or staged (ipc.py)

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9

    @property
    def paused_seconds(self) -> float:
        """The longest time any engine admitted no new request for this push."""
        return max((p["paused_seconds"] for p in self.profile), default=0.0)


def gather(futures: list[Any], deadline: float | None, what: str, setting: str,
           name: Callable[[int], str] = "engine {}".format, failed: type[Exception] = sync.SyncError,
           late: type[Exception] = TimeoutError, tick: Callable[[], None] = lambda: None) -> list[Any]:
    """The results of `futures` (one per engine, or rank: `name(position)`) by `deadline` (None: no
    deadline, the callees' own waits bound them). The first failure is `failed`, naming its callee; the
    deadline is `late`, naming the ones still out and `setting`. `tick()` runs at least every 0.2 s."""
    import ray

    index = {f: i for i, f in enumerate(futures)}
    results: dict[int, Any] = {}
    pending = list(futures)
    while pending:
        left = 0.2 if deadline is None else min(max(deadline - time.monotonic(), 0), 0.2)
        ready, pending = ray.wait(pending, num_returns=1, timeout=left)
        tick()
        if not ready and (deadline is None or time.monotonic() < deadline):
            continue
        if not ready:
            names = ", ".join(name(index[f]) for f in pending)
            raise late(f"{what}: {names} did not answer within {setting}; raise it or check their logs")
        for f in ready:
            try:
                results[index[f]] = ray.get(f)
            except Exception as exc:
                raise failed(f"{what}: {name(index[f])} failed: {describe(exc)}") from None
    return [results[i] for i in range(len(futures))]


def first_failure(futures: list[Any]) -> str | None:
    import ray

    done, _ = ray.wait(list(futures), num_returns=len(futures), timeout=0)
    for i, f in enumerate(futures):
        if f in done:
            try:
                ray.get(f)
            except Exception as exc:
                return f"engine {i}: {describe(exc)}"
    return None


def _prompt_request(prompt: Any, params: dict[str, Any] | None) -> Request:
    if isinstance(prompt, Request):
        return prompt
    if isinstance(prompt, str):
        return Request(prompt=prompt, params=params)
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        return Request(messages=prompt, params=params)
    return Request(prompt_token_ids=list(prompt), params=params)


class Fleet:
    def __init__(self, spec: FleetSpec, engines: list[Any], groups: list[Any]):
        self.spec, self.engines, self.groups = spec, engines, groups
        self.version = 0  # the newest version this process pushed (WeightSender)

    @classmethod
    def start(cls, spec: FleetSpec, model: str | None = None, trainers: Any = None) -> Fleet:
        """Start the engines, waiting up to timeouts.initSeconds in all: one placement group per engine
        on the inference pool, or (colocated) engine i in the bundle of trainer rank i of `trainers`
        (a started TrainerGroup), on its GPU."""
        import ray

        deadline = time.monotonic() + spec.timeouts.init_seconds
        model = model or tiny.resolve(spec.model.name)
        print(f"[rollfleet] waiting up to {spec.timeouts.init_seconds} s (timeouts.initSeconds) for "
              f"{spec.engines} {spec.engine} engine(s) × TP {spec.vllm.tensor_parallel_size}"
              + (", each on a trainer rank's GPU (colocated)" if spec.colocated else ""), flush=True)
        actor = ray.remote(EngineActor)
        config = runtime_config(spec)
        if spec.colocated:
            if trainers is None:
                raise ValueError("the colocated layout starts its engines next to a started TrainerGroup")
            per_node = spec.trainer_pool.gpus_per_node
            groups = []  # the trainer group owns the placement groups
            engines = [actor.options(**placement.colocated_engine_options(
                spec, trainers.groups[i // per_node], i % per_node)).remote(config, i, model, trainers.infos[i]["gpus"])
                for i in range(spec.engines)]
        else:
            groups = placement.reserve_engines(spec, spec.timeouts.init_seconds)
            engines = [actor.options(**placement.engine_options(spec, g)).remote(config, i, model)
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

    def rollouts(self, engines: list[int] | None = None) -> Rollouts:
        """A new rollout client (its own queue on each engine; all engines, or the ones given): submit,
        results, take."""
        return Rollouts(self, engines)

    def generate(self, prompts: Iterable[Any], params: dict[str, Any] | None = None,
                 timeout_s: float | None = None, engines: list[int] | None = None) -> list[Completion]:
        """Blocking: one Completion per prompt, in order. A prompt is text, token ids, chat messages
        or a Request; `params` are the sampling params of the non-Request ones."""
        with self.rollouts(engines) as client:
            return client.generate([_prompt_request(p, params) for p in prompts], timeout_s)

    def sender(self, device: Any = None, rank: int = 0) -> Any:
        """Call inside trainer rank 0: forms the sync group with every engine worker. Colocated: every
        rank calls it and gets the handoff to the engine on its own GPU (ipc.IpcSender)."""
        if self.spec.colocated:
            from rollfleet.runtime.ipc import IpcSender

            return IpcSender(self, rank, device or "cpu")
        return WeightSender(self, device)

    def health(self, timeout_s: float | None = None) -> list[dict[str, Any]]:
        """Each engine's state and weight version; errors name the engine (timeouts.healthSeconds)."""
        t = self.spec.timeouts.health_seconds if timeout_s is None else timeout_s
        return gather([e.health.remote() for e in self.engines], time.monotonic() + t, "health",
                      f"timeouts.healthSeconds={t:g}")

    def unresponsive(self, timeout_s: float = HEALTH_PROBE_SECONDS) -> list[str]:
        """Engines that died or do not answer health within `timeout_s` (frozen), one line each."""
        import ray

        refs = [e.health.remote() for e in self.engines]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
        out = []
        for i, ref in enumerate(refs):
            if ref not in ready:
                out.append(f"engine {i} stopped responding (health did not answer within {timeout_s:g} s)")
                continue
            try:
                ray.get(ref)
            except Exception as exc:
                out.append(f"engine {i} died ({describe(exc)})")
        return out

    def call(self, fn: Callable, *args: Any) -> list[list[Any]]:
        """`fn(worker, *args)` in every worker of every engine (benchmarks and tests)."""
        t = self.spec.sync.timeout_seconds
        return gather([e.call.remote(fn, *args) for e in self.engines], time.monotonic() + t, "call",
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
        self.fleet, self.version = fleet, fleet.version
        self.timeout_s = spec.sync.timeout_seconds
        self.bucket_bytes = spec.sync.bucket_mib << 20
        self.inflight = spec.sync.inflight
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
        self.broken: str | None = None

    def push(self, named_tensors: Iterable[tuple[str, Any]] | Any, verify: bool | None = None) -> PushStats:
        """Stream HF-named, unsharded tensors (or a model, gathered by trainer_group.full_tensors, which
        every trainer rank must then iterate too: ctx.push does) to every engine, bucket by bucket,
        consuming them lazily (extra memory on this rank: two buckets + the one tensor read ahead). Each
        engine applies `sync.inflight`, loads, resets its prefix cache, and its checksums must equal
        the sender's (`verify`, default sync.verifyChecksums)."""
        import torch

        if isinstance(named_tensors, torch.nn.Module):
            from rollfleet.runtime.trainer_group import full_tensors

            named_tensors = full_tensors(named_tensors)
        if self.broken:
            raise sync.SyncError(f"push v{self.version + 1}: the sync group is broken since {self.broken}; "
                                 f"restart the fleet to form it again")
        spec = self.fleet.spec
        push = sync.Push(self.version + 1, self.bucket_bytes,
                         spec.sync.verify_checksums if verify is None else verify, self.inflight)
        what = f"push v{push.version}"
        t0 = time.perf_counter()
        deadline = time.monotonic() + self.timeout_s
        acks = [e.receive.remote(push) for e in self.fleet.engines]  # before the first tensor exists
        try:
            sent = sync.send(push, named_tensors, self.transport, deadline, lambda: first_failure(acks))
            send_seconds = time.perf_counter() - t0
            results = gather(acks, deadline, what, f"sync.timeoutSeconds={self.timeout_s}")
        except (sync.SyncError, TimeoutError) as exc:
            self.broken = what
            raise sync.SyncError(self._blame(exc, acks)) from None
        seconds = time.perf_counter() - t0
        ok = None
        if push.verify:
            for r in results:
                for tp_rank, sums in enumerate(r["checksums"]):
                    if sums != sent.checksums:
                        buckets = [k for k, (a, b) in enumerate(zip(sums, sent.checksums)) if a != b] or "count"
                        self.broken = what
                        raise sync.SyncError(f"{what}: engine {r['engine']} TP rank {tp_rank} checksum mismatch "
                                             f"in bucket(s) {buckets}; the transport corrupted data")
            ok = True
        self.version = push.version
        self.fleet.version = max(self.fleet.version, push.version)
        profile = tuple({k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items() if k != "checksums"}
                        for r in results)
        return PushStats(push.version, sent.bytes, sent.buckets, sent.tensors, seconds, len(results), ok,
                         send_seconds, profile, self.fleet.spec.sync_backend)

    def _blame(self, exc: BaseException, acks: list[Any]) -> str:
        """Name the engine that stopped making progress, not a healthy one that timed out waiting."""
        stuck = self.fleet.unresponsive()
        if not stuck:  # every engine answers: whatever Ray already knows, or the error itself
            deadline = time.monotonic() + min(5.0, self.timeout_s)
            while time.monotonic() < deadline and not first_failure(acks):
                time.sleep(0.05)
            failure = first_failure(acks)
            stuck = [failure] if failure and failure not in str(exc) else []
        culprit = "; ".join(stuck) or "no engine reported an error"
        return (f"{exc}; {culprit}. The sync group is broken (every engine's weights are undefined): "
                f"restart the fleet to form it again")
