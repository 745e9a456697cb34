"""The trainer group: one Ray actor per trainer GPU over the whole trainer pool, torch.distributed
across them, and `job.entrypoint` (`module:function`) called as `function(ctx)` on every rank.

* Placement: one STRICT_PACK placement group per trainer node (a bundle per GPU, on the `trainer`
  resource), so ranks go node by node: rank = node · gpusPerNode + local rank.
* The default torch.distributed group is created before any user framework initialises and without
  `device_id` (open-instruct #1311: otherwise the second group hangs after step 1), on a TCPStore that
  rank 0 binds to a kernel-picked port, with the same NCCL environment as the engines.
* Only global rank 0 joins the weight-sync group (`ctx.sender`; colocated: every rank hands off to its
  own engine). `ctx.push(model)` is called by every rank: the parameters are gathered tensor by tensor
  (FSDP2 `full_tensor()`, DeepSpeed ZeRO-3 `GatheredParameters`, or plain tensors) in the same order
  everywhere, and rank 0 streams them; a push an engine fault broke is sent again, every rank agreeing.
* A rank that fails to start, to join or while running is an error naming the rank and its node.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import time
from datetime import timedelta
from typing import Any, Callable

from rollfleet.runtime import metrics, placement, sync
from rollfleet.runtime.calls import gather
from rollfleet.runtime.push import full_tensors, sharded
from rollfleet.runtime.rollout import as_request
from rollfleet.runtime.supervisor import FleetFailed
from rollfleet.runtime.sync import SyncError
from rollfleet.spec import FleetSpec, load_spec, runtime_config

BUILTIN = "rollfleet.runtime.trainer:grpo"


class TrainerError(RuntimeError):
    """A trainer rank failed: the message names the rank and its node."""


@dataclasses.dataclass
class TrainerContext:
    """What `job.entrypoint` gets on every rank."""

    rank: int
    local_rank: int
    world_size: int
    node: str
    device: Any  # torch.device of this rank
    spec: FleetSpec
    fleet: Any  # the Fleet: rollouts(), generate(), health()
    sender: Any = None  # rank 0: the WeightSender; other ranks: None (colocated: every rank, ipc.IpcSender)
    version: int = 0  # the policy version of the weights being trained (the fleet's newest at the start)
    report: Callable[[dict[str, Any]], None] = print  # rank 0: one row per step, printed by the launcher
    _pushed: Any = None  # what the last push sent (a lone rank re-sends it to a replaced engine)

    @property
    def model_path(self) -> str:
        """Where this rank loads the model the engines serve (the name, or the built tiny model)."""
        from rollfleet.runtime import tiny

        return tiny.resolve(self.spec.model.name)

    def push(self, model_or_tensors, version: int | None = None) -> Any:
        """Every rank calls it after its optimizer step: the model is gathered tensor by tensor (see
        push.full_tensors) and rank 0 streams it to every engine; colocated, every rank hands it to the
        engine on its GPU (ipc.IpcSender). If an engine fails during the push, every rank learns it and
        the push is sent again (the same version) once the fleet has replaced the engine, at most
        recovery.maxRestarts + 1 times; an iterable of tensors, consumed by the first try, is not.
        `version`: default one more than the last; `self.version` re-sends the current one.
        Returns the push's stats where this rank sent, else None."""
        import torch

        version = self.version + 1 if version is None else version
        again = isinstance(model_or_tensors, torch.nn.Module)
        collective = again and sharded(model_or_tensors)
        attempts = self.spec.recovery.max_restarts + 1 if again else 1
        for attempt in range(1, attempts + 1):
            stats, error = None, None
            # a sharded model's gathers are collectives: this rank drains what a failed push left of them
            source = full_tensors(model_or_tensors) if collective else model_or_tensors
            if self.sender is not None:
                try:
                    stats = self.sender.push(source, version=version)
                except SyncError as exc:
                    error = exc
                    for _ in source if collective else ():
                        pass
            elif collective:
                for _ in source:  # take part in every gather
                    pass
            failed = self._any(error is not None)
            if not failed:
                break
            if attempt == attempts:
                raise error or SyncError(f"push v{version}: another rank's push failed {attempts} times")
            print(f"[rollfleet] trainer rank {self.rank}: push v{version} failed"
                  + (f" ({error})" if error else " on another rank") + "; sending it again once the fleet settled",
                  flush=True)
            roster = self.fleet.settle(self.fleet.timeouts.init.outer)
            if roster["failed"]:
                raise FleetFailed(roster["failed"])
        self.version = version
        self._pushed = model_or_tensors if again else None
        if stats is not None and attempt > 1:
            stats = dataclasses.replace(stats, attempts=attempt)
        if stats is not None:
            metrics.observe("rollfleet_push_seconds", stats.seconds, fleet=self.spec.name)
            metrics.observe("rollfleet_push_bytes", stats.bytes, fleet=self.spec.name)
        return stats

    def _any(self, flag: bool) -> bool:
        """Whether `flag` holds on any rank (a collective every rank calls in the same order)."""
        if self.world_size == 1:
            return flag
        import torch
        from torch import distributed as dist

        t = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def catch_up(self) -> None:
        """A lone rank (world size 1) re-sends the weights of the current version to an engine that
        was replaced after the last push: the rank's requests have no other engine to go to. With more
        ranks the next push re-admits it (its gathers are collectives the other ranks are not in)."""
        if self.world_size == 1 and self._pushed is not None and self.sender is not None:
            print(f"[rollfleet] trainer rank {self.rank}: re-sending v{self.version} to the replaced engine",
                  flush=True)
            self.push(self._pushed, version=self.version)

    @property
    def engines(self) -> list[int] | None:
        """The engines this rank's rollouts go to: all of them, or (colocated) the one on its GPU, which
        sleeps when this rank trains (another rank's requests would wait there for its next push)."""
        return self.fleet.layout.engines_of(self.rank)

    def rollouts(self):
        """A rollout client on this rank's engines (`engines`; colocated: any serving engine while its
        own is being replaced)."""
        return self.fleet.rollouts(self.engines, fallback=self.engines is not None, on_stall=self.catch_up)

    def generate(self, prompts, params=None, timeout_s=None):
        """fleet.generate on this rank's engines."""
        with self.rollouts() as client:
            return client.generate([as_request(p, params) for p in prompts], timeout_s)

    def release(self) -> None:
        """Call before training, on every rank: in the colocated layout the engine on this rank's GPU
        drains and sleeps (vLLM sleep level 2) so training gets the memory; the next `push` wakes it.
        The ranks pass a barrier first, so a rank whose engine is being replaced can still use the
        others' engines until every rank has its batch. Dedicated: nothing."""
        if not self.fleet.layout.colocated:
            return
        if self.world_size > 1:
            from torch import distributed as dist

            dist.barrier()
        try:
            self.fleet.layout.release(self.fleet, self.rank)
        except Exception as exc:  # it is being replaced: the new incarnation holds no KV to free yet
            print(f"[rollfleet] trainer rank {self.rank}: engine {self.rank} did not sleep ({exc}); training anyway",
                  flush=True)


class TrainerRank:
    """One trainer rank (one GPU of the trainer pool)."""

    def __init__(self, spec_json: dict[str, Any], rank: int, local_rank: int, world_size: int):
        self.spec = load_spec(spec_json)
        self.rank, self.local_rank, self.world_size = rank, local_rank, world_size
        self.store = None

    def info(self) -> dict[str, Any]:
        import ray

        return {"rank": self.rank, "node": ray.util.get_node_ip_address(), "gpus": ray.get_gpu_ids(),
                "pid": os.getpid()}

    def open_store(self) -> tuple[str, int]:
        """Rank 0: the rendezvous store of the default group, on a port the kernel picks."""
        import ray

        host = ray.util.get_node_ip_address()
        self.store, port = sync.open_store(host, self.world_size, self.spec.sync.timeout_seconds)
        return host, port

    def init(self, host: str, port: int) -> None:
        """The default torch.distributed group: before any framework, and without `device_id`."""
        import torch
        from torch import distributed as dist

        gpu = self.spec.engine == "vllm"
        os.environ.update(RANK=str(self.rank), LOCAL_RANK=str(self.local_rank), WORLD_SIZE=str(self.world_size),
                          LOCAL_WORLD_SIZE=str(self.spec.trainer_pool.gpus_per_node), MASTER_ADDR=host,
                          MASTER_PORT=str(port))
        if gpu:
            torch.cuda.set_device(0)  # Ray made this rank's GPU the only visible one
        else:
            torch.set_num_threads(1)
        timeout_s = self.spec.sync.timeout_seconds
        store = self.store or sync.connect_store(host, port, self.world_size, timeout_s)
        dist.init_process_group("cpu:gloo,cuda:nccl" if gpu else "gloo", store=store, rank=self.rank,
                                world_size=self.world_size, timeout=timedelta(seconds=timeout_s))

    def run(self, fleet, entrypoint: str, report=None) -> Any:
        """Build this rank's context (rank 0 forms the weight-sync group) and call the entrypoint."""
        import ray
        import torch

        module, _, func = entrypoint.partition(":")
        fn = getattr(importlib.import_module(module), func)
        gpu = self.spec.engine == "vllm"
        device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
        clock = metrics.StepClock(self.spec.name)

        def on_row(row: dict[str, Any]) -> None:
            clock.row(row)
            if report is not None:
                report.put(row)
            else:
                print(row, flush=True)

        ctx = TrainerContext(self.rank, self.local_rank, self.world_size, ray.util.get_node_ip_address(), device,
                             self.spec, fleet, version=fleet.version, report=on_row)
        ctx.sender = fleet.sender(device, self.rank)
        return fn(ctx)


class TrainerGroup:
    """The ranks of the trainer pool, started and joined into one torch.distributed group."""

    def __init__(self, spec: FleetSpec, ranks: list[Any], groups: list[Any], infos: list[dict[str, Any]]):
        self.spec, self.ranks, self.groups, self.infos = spec, ranks, groups, infos

    @classmethod
    def start(cls, spec: FleetSpec) -> TrainerGroup:
        import ray

        pool = spec.trainer_pool
        world = pool.gpus
        timeout_s = spec.sync.timeout_seconds
        groups = placement.reserve_trainers(spec, spec.timeouts.init_seconds)
        config = runtime_config(spec)
        actor = ray.remote(TrainerRank)
        ranks = [actor.options(**placement.trainer_options(spec, groups[r // pool.gpus_per_node],
                                                            r % pool.gpus_per_node)).remote(
            config, r, r % pool.gpus_per_node, world) for r in range(world)]
        group = cls(spec, ranks, groups, [{"rank": r, "node": "?"} for r in range(world)])
        try:
            group.infos = group._wait([a.info.remote() for a in ranks], spec.timeouts.init_seconds,
                                      "start", "timeouts.initSeconds")
            host, port = group._wait([ranks[0].open_store.remote()], timeout_s, "rendezvous", "sync.timeoutSeconds")[0]
            print(f"[rollfleet] trainer group: {world} rank(s) on {len(groups)} node(s), torch.distributed "
                  f"{'nccl' if spec.engine == 'vllm' else 'gloo (CPU stand-in for NCCL)'} via {host}:{port}; "
                  f"waiting up to {timeout_s} s (sync.timeoutSeconds)", flush=True)
            group._wait([a.init.remote(host, port) for a in ranks], timeout_s + 5, "torch.distributed init",
                        "sync.timeoutSeconds")
        except BaseException:
            group.shutdown()
            raise
        return group

    def _name(self, rank: int) -> str:
        return f"trainer rank {rank} (node {self.infos[rank].get('node', '?')})"

    def _wait(self, refs: list[Any], timeout_s: float | None, what: str, setting: str,
              tick: Callable[[], None] = lambda: None) -> list[Any]:
        """Results of one call per rank (position = rank); the first failure or the deadline is an
        error naming the rank(s) and their node. `timeout_s` None: no deadline (the ranks' own waits
        bound them)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        within = f"{timeout_s:g} s ({setting})" if timeout_s is not None else setting
        return gather(refs, deadline, f"trainer {what}", within, self._name, TrainerError, TrainerError, tick)

    def run(self, fleet, entrypoint: str, on_report: Callable[[dict[str, Any]], None] = print,
            timeout_s: float | None = None, setting: str = "") -> Any:
        """`entrypoint(ctx)` on every rank; returns rank 0's result. The first rank to fail is named.
        Rows rank 0 passes to `ctx.report` reach `on_report` here as they come."""
        from ray.util.queue import Empty, Queue

        queue = Queue(actor_options={"num_cpus": 0})

        def drain():
            while True:
                try:
                    on_report(queue.get_nowait())
                except Empty:
                    return

        refs = [a.run.remote(fleet, entrypoint, queue if i == 0 else None) for i, a in enumerate(self.ranks)]
        try:
            result = self._wait(refs, timeout_s, f"run of {entrypoint}", setting, tick=drain)[0]
            drain()
            return result
        finally:
            queue.shutdown()

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        for a in self.ranks:
            ray.kill(a)
        for g in self.groups:
            remove_placement_group(g)
