"""Rollout engines: one threaded Ray actor per engine, running vLLM's async engine (`AsyncLLM`) or
the CPU stand-in (standin.py, same interface) on a private asyncio loop.

* Requests are admitted as they arrive (continuous batching across steps); each of a request's `n`
  samples is one engine request with final-only output; a request's result goes to its client's
  queue when all its samples are done, for `poll` to collect.
* Per-token account: every stretch of a sample's tokens is stamped with the weight version that
  generated it (`versions`: run-length `[first token, version]`), with its behaviour logprobs when
  asked. A per-version cache salt keeps a request from ever hitting prefix-cache blocks of another
  version, and the prefix cache is reset after every push (a False result is an error).
* A push, in this order and never a decoding step in between: admission stops; the in-flight samples
  are handled by `sync.inflight`; the weights are loaded; the prefix cache is reset; the version is
  stamped; admission and decoding resume.
  `wait`  drain: the push starts once every admitted sample finished (on the old weights);
  `abort` interrupt the unfinished samples, discard their tokens, generate them again on the new
          weights (finished samples of a group are kept: a group may mix versions, a sample never);
  `keep`  interrupt the unfinished samples and continue them on the new weights from the tokens they
          have: their KV is recomputed with the new weights (what vLLM's keep-and-reset does), and
          their `versions` say which tokens came from which weights.
  Interrupting is vLLM's abort of a request, which hands back the tokens it has so far; it exists in
  0.14.1 and 0.20.2 alike, so no release line needs `pause_generation(mode="keep")`.
* `health()` reads plain attributes: it answers while a push or any generation is in flight;
  `probe()` is a timed round trip through the engine core (the supervisor's liveness signal).
* A failed push leaves the engine stale (its weights undefined): it admits nothing until a push
  reaches it again, and keeps its requests for then. An engine core that died hands every request
  back to its client to be sent to another engine (`retry`), and the supervisor restarts the engine.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import json
import os
import tempfile
import threading
import time
import uuid
from collections import deque
from pathlib import Path
from typing import Any, Callable

from rollfleet.runtime import metrics, sync
from rollfleet.runtime.calls import EngineStartError, describe
from rollfleet.runtime.push import Push
from rollfleet.runtime.timeouts import Timeouts
from rollfleet.spec import FleetSpec, load_spec

EXTENSION = "rollfleet.runtime.ext.WeightSyncExtension"


def vllm_sampling(params: dict[str, Any], index: int) -> dict[str, Any]:
    """SamplingParams keywords for sample `index` of a request (one engine request per sample)."""
    out = {k: v for k, v in params.items() if k not in ("n", "seed", "logprobs", "stop", "stop_token_ids")}
    out.update(n=1, seed=None if params["seed"] is None else params["seed"] + index,
               logprobs=0 if params["logprobs"] else None,  # 0: the sampled token's logprob only
               stop=params["stop"] or None, stop_token_ids=params["stop_token_ids"] or None)
    return out


def continued(params: dict[str, Any], produced: int) -> dict[str, Any]:
    """The sampling params of a sample that goes on after `produced` tokens (its prompt grows by them)."""
    if not produced:
        return params
    return {**params, "max_tokens": params["max_tokens"] - produced,
            "min_tokens": max(0, params["min_tokens"] - produced)}


def ray_stat_loggers() -> list | None:
    """vLLM's metrics through Ray's metrics API, on the node's metrics port as ray_vllm_* (docs/monitoring.md):
    its Ray stat logger, where it works. vllm.v1.metrics.ray_wrappers imports `ray.serve` (ray[serve]'s packages,
    which the image has) and leaves `ray_metrics` None without it; passing the logger then fails the engine's
    start (seen on a GPU host). None: vLLM's default loggers, and one line saying what is missing."""
    import importlib

    ray_wrappers = importlib.import_module("vllm.v1.metrics.ray_wrappers")
    if getattr(ray_wrappers, "ray_metrics", True) is None:
        try:
            from ray import serve  # noqa: F401 (what the wrapper needs, for the message)
            why = "its import of ray.util.metrics failed"
        except ImportError as exc:
            why = f"it needs ray.serve ({type(exc).__name__}: {exc})"
        print(f"[rollfleet] metrics: vLLM's Ray stat logger is unavailable here, {why}; vLLM's own metrics do not "
              f"reach Ray's endpoint (rollfleet_* do); install ray[serve]", flush=True)
        return None
    return [ray_wrappers.RayPrometheusStatLogger]


class VllmCore:
    """The real engine core: vLLM `AsyncLLM` with the rollfleet worker extension (executor uni / mp)."""

    kind = "vllm"

    def __init__(self, spec: FleetSpec, model: str):
        self.spec, self.model = spec, model
        self._requests: dict[str, list[str]] = {}  # key -> its samples' vLLM request ids

    async def start(self) -> None:
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM
        spec, v = self.spec, self.spec.vllm
        tp = v.tensor_parallel_size
        optional = {"revision": spec.model.revision, "max_model_len": spec.model.max_model_len,
                    "max_num_seqs": v.max_num_seqs}
        args = AsyncEngineArgs(
            model=self.model, tokenizer=self.model, dtype=spec.model.dtype, seed=v.seed,
            tensor_parallel_size=tp, gpu_memory_utilization=v.gpu_memory_utilization,
            enable_prefix_caching=v.enable_prefix_caching, enforce_eager=v.enforce_eager,
            # never "ray" inside a Ray actor (vllm#30016): an engine stays on one node
            distributed_executor_backend="uni" if tp == 1 else "mp",
            worker_extension_cls=EXTENSION,
            enable_sleep_mode=spec.colocated,  # the engine sleeps while the trainer trains on its GPU
            **{k: x for k, x in optional.items() if x is not None},
            **{"disable_log_stats": False, **v.extra_engine_args})  # extraEngineArgs may turn the stats off
        loggers = None if args.disable_log_stats else ray_stat_loggers()
        self.llm = AsyncLLM.from_engine_args(args, stat_loggers=loggers)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model, revision=spec.model.revision)
        self.max_model_len = self.llm.model_config.max_model_len
        self.vocab_size = self.llm.model_config.get_vocab_size()

    async def generate(self, key: str, jobs: list[tuple[int, list[int], dict[str, Any]]], salt: str,
                       on_sample: Callable[[int, dict[str, Any]], None]) -> None:
        """Each job (sample index, prompt token ids, sampling params) is one vLLM request; `on_sample`
        gets its final output, or (after `abort(key)`) the tokens it had, with finish_reason "abort"."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        ids = self._requests.setdefault(key, [])

        async def one(index: int, prompt: list[int], params: dict[str, Any]) -> None:
            sampling = SamplingParams(**vllm_sampling(params, index), output_kind=RequestOutputKind.FINAL_ONLY)
            request_id = f"{key}-{index}"
            ids.append(request_id)
            final = None
            async for final in self.llm.generate({"prompt_token_ids": prompt, "cache_salt": salt}, sampling,
                                                 request_id):
                pass
            c = final.outputs[0]
            logprobs = [pos[t].logprob for pos, t in zip(c.logprobs, c.token_ids)] if params["logprobs"] else None
            on_sample(index, {"token_ids": list(c.token_ids), "text": c.text, "finish_reason": c.finish_reason,
                              "logprobs": logprobs})

        try:
            async with asyncio.TaskGroup() as group:  # a failure or a cancel ends every sample
                for index, prompt, params in jobs:
                    group.create_task(one(index, prompt, params))
        finally:
            self._requests.pop(key, None)

    async def abort(self, key: str) -> None:
        """Interrupt `key`'s samples: each ends with the tokens it has (vLLM's abort output)."""
        ids = list(self._requests.get(key, ()))
        if ids:
            await self.llm.abort(ids)

    def failure(self) -> str | None:
        """Why the engine core is gone, or None while it runs."""
        return "vLLM's engine core died (EngineDeadError)" if self.llm.errored else None

    async def probe(self, timeout_s: float) -> Any:
        """A round trip through the engine core to every worker (a process that answers can still
        have a dead engine core)."""
        return await self.llm.collective_rpc("rollfleet_probe", timeout=timeout_s)

    async def join(self, host: str, port: int, position: int, world_size: int, timeout_s: float) -> list[int]:
        return await self.llm.collective_rpc("rollfleet_join", timeout=timeout_s, args=(
            host, port, position, self.spec.vllm.tensor_parallel_size, world_size, timeout_s))

    async def receive(self, push: Push, timeout_s: float) -> list[dict[str, Any]]:
        """Per TP worker: {"checksums": [...], "seconds": receive time inside the worker}."""
        return await self.llm.collective_rpc("rollfleet_receive", timeout=timeout_s,
                                             args=(push.to_wire(), timeout_s))

    async def reset_prefix_cache(self, reset_running_requests: bool = False) -> bool:
        return bool(await self.llm.reset_prefix_cache(reset_running_requests=reset_running_requests))

    async def call(self, fn: Callable, args: tuple) -> list[Any]:
        """`fn(worker, *args)` in every TP worker (benchmarks and tests; needs insecure serialization)."""
        return await self.llm.collective_rpc(fn, args=args)

    async def sleep(self, level: int) -> None:
        await self.llm.sleep(level=level)

    async def wake_up(self, tags: list[str]) -> None:
        await self.llm.wake_up(tags=tags)

    async def load_ipc(self, msg: dict[str, Any]) -> list[dict[str, Any]]:
        """One colocated handoff call (ipc.load) in every worker."""
        return await self.llm.collective_rpc("rollfleet_ipc_load", timeout=self.spec.sync.timeout_seconds,
                                             args=(msg,))

    async def shutdown(self) -> None:
        self.llm.shutdown()


def _start_error(spec: FleetSpec, index: int, exc: BaseException) -> EngineStartError:
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, ImportError) and "vllm" in text:
        return EngineStartError(
            f"engine {index}: vLLM is not installed here (it is Linux x86_64 + CUDA only); set engine: "
            f"cpu-standin for a CPU run, or run in the rollfleet image ({text})")
    if "out of memory" in text.lower() or "no available memory for the cache blocks" in text.lower():
        return EngineStartError(
            f"engine {index}: CUDA out of memory at engine start; lower vllm.gpuMemoryUtilization "
            f"(now {spec.vllm.gpu_memory_utilization}) to 0.8 or 0.7, or lower model.maxModelLen ({text[:300]})")
    return EngineStartError(f"engine {index}: failed to start: {text[:2000]}")


@dataclasses.dataclass(eq=False)
class SampleState:
    """One sample's tokens so far, and which weight version produced each stretch of them."""

    index: int
    tokens: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    runs: list[list[int]] = dataclasses.field(default_factory=list)  # [first token, version], in order
    text: str = ""
    finish_reason: str | None = None

    def add(self, out: dict[str, Any], version: int) -> None:
        """One stretch generated on `version` (the whole sample, or up to an interruption)."""
        if out["token_ids"] or (not self.runs and out["finish_reason"] != "abort"):
            if not self.runs or self.runs[-1][1] != version:
                self.runs.append([len(self.tokens), version])
            self.tokens += out["token_ids"]
            self.logprobs += out["logprobs"] or []
            self.text += out["text"]
        if out["finish_reason"] != "abort":
            self.finish_reason = out["finish_reason"]

    def restart(self) -> None:
        """sync.inflight: abort: the tokens so far are dropped; the sample starts again."""
        self.tokens, self.logprobs, self.runs, self.text = [], [], [], ""

    def wire(self, logprobs: bool) -> dict[str, Any]:
        return {"index": self.index, "token_ids": self.tokens, "text": self.text, "finish_reason": self.finish_reason,
                "logprobs": self.logprobs if logprobs else None, "versions": [tuple(r) for r in self.runs]}


@dataclasses.dataclass(eq=False)
class Group:
    """One request on this engine: its samples, finished or not."""

    client: str
    id: str
    prompt: list[int]
    params: dict[str, Any]
    samples: dict[int, SampleState]
    attempt: int = 0  # how often it was admitted here (each admission is one engine-side key)
    task: asyncio.Task | None = None

    @property
    def key(self) -> str:
        return f"{self.id}.{self.attempt}"

    @property
    def todo(self) -> list[SampleState]:
        return [s for s in self.samples.values() if s.finish_reason is None]

    def jobs(self) -> list[tuple[int, list[int], dict[str, Any]]]:
        """What the engine core generates: each unfinished sample from its prompt and its tokens so far."""
        return [(s.index, self.prompt + s.tokens, continued(self.params, len(s.tokens))) for s in self.todo]

    def result(self) -> dict[str, Any]:
        return {"id": self.id, "prompt_token_ids": self.prompt,
                "samples": [self.samples[i].wire(self.params["logprobs"]) for i in sorted(self.samples)]}


class Scheduler:
    """The engine's request and push logic. It runs on the engine's private loop (its coroutines and
    `enqueue`), apart from `deliver`/`poll`, which any thread may call. Kept out of EngineActor: Ray
    runs an actor with any coroutine method as an asyncio actor, whose sync methods would block
    each other and `health()`."""

    def __init__(self, index: int, spec: FleetSpec, core: Any):
        self.index, self.spec, self.core = index, spec, core
        self.timeouts = Timeouts.of(spec)
        self.version = 0
        self.stale: str | None = None  # a push failed: the weights are undefined until one succeeds
        self.dead: str | None = None  # the engine core is gone: clients send its requests elsewhere
        self.phase, self.since = "ready", time.time()  # ready / draining / receiving / asleep / stale / dead
        self.admitting = True
        self.queue: deque[Group] = deque()  # waiting for admission
        self.running: dict[str, Group] = {}  # admitted
        self.parked: list[Group] = []  # interrupted by a push or a sleep, resumed after it
        self.idle = asyncio.Event()
        self.idle.set()
        self.results: dict[str, deque[dict[str, Any]]] = {}  # client -> finished requests
        self.cond = threading.Condition()
        self.counts = {"admitted": 0, "completed": 0, "interrupted": 0}  # samples
        self.last_push: dict[str, Any] | None = None
        self.asleep = False
        self._ipc_started = 0.0
        self.tags = {"fleet": spec.name, "engine": index}  # its metrics' labels (metrics.py)
        metrics.set("rollfleet_weight_version", 0, **self.tags)
        for name in ("rollfleet_requests_received", "rollfleet_requests_completed", "rollfleet_requests_failed",
                     "rollfleet_tokens_generated"):
            metrics.zero(name, **self.tags)

    def _count(self) -> None:
        """The request gauges: generating now, and waiting for admission or for the end of a push."""
        metrics.set("rollfleet_requests_in_flight", len(self.running), **self.tags)
        metrics.set("rollfleet_requests_queued", len(self.queue) + len(self.parked), **self.tags)

    def enter(self, phase: str) -> None:
        self.phase, self.since = phase, time.time()

    # ---- results (any thread) -------------------------------------------------------------------

    def deliver(self, client: str, item: dict[str, Any]) -> None:
        item["engine"] = self.index
        with self.cond:
            self.results.setdefault(client, deque()).append(item)
            self.cond.notify_all()

    def poll(self, client: str, wait_s: float) -> list[dict[str, Any]]:
        with self.cond:
            self.cond.wait_for(lambda: self.results.get(client), timeout=wait_s)
            return list(self.results.pop(client, ()))

    # ---- requests (the loop) ------------------------------------------------------------------

    def enqueue(self, groups: list[Group]) -> None:
        for g in groups:
            if self.dead:
                self.deliver(g.client, {"id": g.id, "retry": self.dead})
            else:
                self.queue.append(g)
                metrics.inc("rollfleet_requests_received", **self.tags)
        self.admit()
        self._count()

    def admit(self) -> None:
        while self.admitting and self.queue and not (self.stale or self.dead):
            g = self.queue.popleft()
            self.counts["admitted"] += len(g.todo)
            self.running[g.id] = g
            self.idle.clear()
            g.task = asyncio.get_running_loop().create_task(self.generate(g))

    def _finished(self, g: Group) -> None:
        self.running.pop(g.id, None)
        if not self.running:
            self.idle.set()
        self._count()

    async def generate(self, g: Group) -> None:
        version = self.version  # constant while g runs: every push waits for or interrupts it first

        def done(i: int, out: dict[str, Any]) -> None:
            g.samples[i].add(out, version)
            self.counts["completed" if out["finish_reason"] != "abort" else "interrupted"] += 1
            metrics.inc("rollfleet_tokens_generated", len(out["token_ids"]), **self.tags)

        try:
            await self.core.generate(g.key, g.jobs(), f"rollfleet-v{version}", done)
        except asyncio.CancelledError:
            raise  # the client cancelled it
        except Exception as exc:
            self._finished(g)
            if self.core.failure():
                self.die(self.core.failure())
                return
            self.deliver(g.client, {"id": g.id, "error": f"{type(exc).__name__}: {exc}"})
            metrics.inc("rollfleet_requests_failed", **self.tags)
            return
        finally:
            g.attempt += 1
        self._finished(g)
        if g.todo:  # interrupted by a pause: it goes on after it
            self.parked.append(g)
        else:
            self.deliver(g.client, g.result())
            metrics.inc("rollfleet_requests_completed", **self.tags)

    async def cancel(self, client: str) -> None:
        self.queue = deque(g for g in self.queue if g.client != client)
        self.parked = [g for g in self.parked if g.client != client]
        mine = [g for g in self.running.values() if g.client == client]
        for g in mine:
            g.task.cancel()
        await asyncio.gather(*(g.task for g in mine), return_exceptions=True)
        for g in mine:
            self._finished(g)
        with self.cond:
            self.results.pop(client, None)

    def die(self, reason: str) -> None:
        """The engine core is gone: every request goes back to its client, to be sent elsewhere."""
        self.dead = f"engine {self.index}: {reason}"
        self.enter("dead")
        for g in [*self.running.values(), *self.queue, *self.parked]:
            if g.task is not None:
                g.task.cancel()
            self.deliver(g.client, {"id": g.id, "retry": self.dead})
        self.running.clear()
        self.queue.clear()
        self.parked.clear()
        self.idle.set()
        self._count()

    # ---- pause and resume (the loop): what a push and a sleep share -----------------------------

    async def _pause(self, policy: str) -> dict[str, Any]:
        """Stop admitting; then drain (`wait`) or interrupt the unfinished samples (`abort`, `keep`).
        Returns when nothing runs on the engine core."""
        self.admitting = False
        in_flight = sum(len(g.todo) for g in self.running.values())
        before = len(self.parked)
        t0 = time.perf_counter()
        if self.running:
            self.enter("draining")
            if policy != "wait":
                groups = list(self.running.values())
                while left := [g.task for g in groups if not g.task.done()]:
                    # again until every sample ended: a request the engine did not know yet when aborted runs on
                    await asyncio.gather(*(self.core.abort(g.key) for g in groups if not g.task.done()))
                    await asyncio.wait(left, timeout=0.05)
            await self.idle.wait()
        interrupted = [s for g in self.parked[before:] for s in g.todo]
        if policy == "abort":
            for s in interrupted:
                s.restart()
        return {"policy": policy, "in_flight": in_flight, "interrupted": len(interrupted),
                "drain_seconds": time.perf_counter() - t0}

    def _resume(self, version: int) -> None:
        """The new weights are in and the prefix cache is reset: stamp the version, admit again, the
        interrupted requests first (in admission order)."""
        self.version = version
        metrics.set("rollfleet_weight_version", version, **self.tags)
        self.stale = None
        self.queue.extendleft(reversed(self.parked))
        self.parked = []
        self.admitting = True
        self.enter("ready")
        self.admit()
        self._count()

    def _check(self) -> None:
        if self.dead:
            raise sync.SyncError(self.dead)

    def _push_failed(self, version: int, exc: BaseException) -> None:
        """A push failed: the weights are undefined (stale) until a push reaches this engine again; its
        requests wait for then. Raises one error saying so."""
        reason = (f"engine {self.index}: push v{version} failed ({type(exc).__name__}: {exc}); its weights are "
                  f"undefined until the next push reaches it")
        self.stale = reason
        self.enter("stale")
        if isinstance(exc, Exception):
            raise sync.SyncError(reason) from None
        raise exc

    # ---- a push over the sync group (the loop) ------------------------------------------------

    async def push(self, push: Push) -> dict[str, Any]:
        self._check()
        t0 = time.perf_counter()
        pause = await self._pause(push.inflight)
        t_ready = time.perf_counter()
        self.enter("receiving")
        # One engine-core round trip: the reset is sent right behind the receive, and the engine core runs
        # utility calls in the order they came, so it resets the moment the last bucket is loaded.
        receive = asyncio.ensure_future(self.core.receive(push, self.timeouts.sync.seconds))
        reset = asyncio.ensure_future(self.core.reset_prefix_cache(reset_running_requests=True))
        try:
            try:
                workers = await receive
            finally:
                reset_ok = await asyncio.gather(reset, return_exceptions=True)
            t_received = time.perf_counter()
            if reset_ok[0] is not True:
                raise sync.SyncError(f"reset_prefix_cache() returned {reset_ok[0]!r}; stale KV would corrupt "
                                     f"rollouts")
        except BaseException as exc:  # an error, or the actor's own deadline cancelling us
            self._push_failed(push.version, exc)
        self._resume(push.version)
        self.last_push = {
            "engine": self.index, "version": push.version, **pause, "checksums": [w["checksums"] for w in workers],
            "worker_seconds": max(w["seconds"] for w in workers), "receive_reset_seconds": t_received - t_ready,
            "paused_seconds": time.perf_counter() - t0}
        metrics.observe("rollfleet_pause_seconds", self.last_push["paused_seconds"], **self.tags)
        return self.last_push

    # ---- the colocated layout (the loop) ------------------------------------------------------

    async def sleep(self) -> None:
        """Free the GPU for the trainer: stop admitting, drain or interrupt (sync.inflight), vLLM sleep
        level 2 (weights and KV discarded: the next push replaces the weights). Requests that arrive
        meanwhile wait for the push."""
        self._check()
        await self._pause(self.spec.sync.inflight)
        if not self.asleep:
            await self.core.sleep(2)
            self.asleep = True
        self.enter("asleep")

    async def push_ipc(self, msg: dict[str, Any]) -> dict[str, Any]:
        """One call of a colocated push (ipc.IpcSender): the first pauses (sync.inflight) and wakes the
        weights, every call loads what it carries, the last wakes the KV cache, resets the prefix cache
        and stamps the version."""
        self._check()
        try:
            if msg["first"]:
                self._ipc_started = time.perf_counter()
                self._ipc_pause = await self._pause(self.spec.sync.inflight)
                self.enter("receiving")
                if self.asleep:
                    await self.core.wake_up(["weights"])
            t0 = time.perf_counter()
            workers = await self.core.load_ipc(msg)
            ack = {"engine": self.index, "workers": workers, "load_rpc_seconds": time.perf_counter() - t0}
            if msg["last"]:
                t1 = time.perf_counter()
                if self.asleep:
                    await self.core.wake_up(["kv_cache"])
                    self.asleep = False
                if not await self.core.reset_prefix_cache(reset_running_requests=True):
                    raise sync.SyncError("reset_prefix_cache() returned False; stale KV would corrupt rollouts")
                self._resume(msg["version"])
                ack.update(version=msg["version"], **self._ipc_pause, wake_reset_seconds=time.perf_counter() - t1,
                           paused_seconds=time.perf_counter() - self._ipc_started)
                self.last_push = ack
                metrics.observe("rollfleet_pause_seconds", ack["paused_seconds"], **self.tags)
            return ack
        except BaseException as exc:
            self._push_failed(msg["version"], exc)


def _leftovers_file(spec: FleetSpec, index: int) -> Path:
    """Where an engine notes its child processes (vLLM's engine core), on its node: a restarted engine
    kills what its predecessor left (a SIGKILLed actor cannot clean up)."""
    return Path(tempfile.gettempdir()) / f"rollfleet-{spec.name}-{spec.namespace}-engine-{index}.json"


def _kill_leftovers(path: Path) -> list[int]:
    """Kill the processes listed in `path` that still run (same pid and start time). Returns their pids."""
    import psutil

    try:
        listed = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    killed = []
    for pid, created in listed:
        try:
            p = psutil.Process(pid)
            if abs(p.create_time() - created) < 1e-3:
                p.kill()
                p.wait(10)
                killed.append(pid)
        except (psutil.Error, OSError):
            pass
    path.unlink(missing_ok=True)
    return killed


class EngineActor:
    """One rollout engine. Create with `ray.remote(EngineActor).options(max_concurrency=32, ...)`:
    Ray runs its methods on separate threads, so `health()` never waits for the others. With Ray's
    `max_restarts`, a killed engine comes back in its placement bundle as a new incarnation (a new
    process), which the supervisor starts."""

    def __init__(self, spec_json: dict[str, Any], index: int, model: str, devices: list[str] | None = None):
        if devices is not None:  # colocated: the GPU(s) of this engine's trainer rank (before any CUDA use)
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, devices))
        self.spec = load_spec(spec_json)
        self.timeouts = Timeouts.of(self.spec)
        self.index, self.model = index, model
        self.incarnation = uuid.uuid4().hex[:8]
        self.leftovers = _leftovers_file(self.spec, index)
        self.killed_leftovers = _kill_leftovers(self.leftovers)  # GPU memory back before this one starts
        self.core: Any = None
        self.sched: Scheduler | None = None
        self.phase, self.since = "created", time.time()  # before the scheduler exists
        self.last_error = None
        self.sync_group, self.group = "not joined", ""
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, daemon=True, name=f"engine-{index}-loop").start()

    def _enter(self, phase: str) -> None:
        self.phase, self.since = phase, time.time()

    def _run(self, coro, timeout_s: float, what: str) -> Any:
        """Run `coro` on the engine's loop and wait for it, at most `timeout_s` (named in the error)."""
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(timeout_s)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TimeoutError(f"engine {self.index}: {what} did not finish within {timeout_s:g} s") from None

    # ---- lifecycle ------------------------------------------------------------------------------

    def start(self) -> dict[str, Any]:
        """Load the model (at most timeouts.initSeconds). Returns where it runs and what it serves."""
        from rollfleet.runtime.standin import StandinCore

        import ray

        if self.sched is not None:
            return self.info
        self._enter("starting")
        try:
            core = (VllmCore if self.spec.engine == "vllm" else StandinCore)(self.spec, self.model)
            self._run(core.start(), self.timeouts.init.seconds, f"start ({self.timeouts.init.setting})")
        except Exception as exc:  # translated into the fix the user needs
            self.last_error = f"{type(exc).__name__}: {exc}"
            self._enter("failed")
            raise _start_error(self.spec, self.index, exc) from None
        self.core = core
        self._note_children()
        self.sched = Scheduler(self.index, self.spec, core)
        self.info = {"engine": self.index, "kind": core.kind, "node": ray.util.get_node_ip_address(),
                     "gpus": ray.get_gpu_ids() if ray.is_initialized() else [], "pid": os.getpid(),
                     "incarnation": self.incarnation, "vocab_size": core.vocab_size,
                     "max_model_len": core.max_model_len, "killed_leftovers": self.killed_leftovers}
        return self.info

    def _note_children(self) -> None:
        import psutil

        children = [(p.pid, p.create_time()) for p in psutil.Process().children(recursive=True)]
        if children:
            self.leftovers.write_text(json.dumps(children))

    def stop(self) -> None:
        """Release the engine (vLLM shuts its engine-core process down)."""
        if self.core is not None:
            try:
                self._run(self.core.shutdown(), 60, "shutdown")
            finally:
                self.core = None
        self.leftovers.unlink(missing_ok=True)
        self._enter("stopped")
        self.sched = None

    def health(self) -> dict[str, Any]:
        """Never waits for the loop or the engine: answers while a push or generation is in flight."""
        s = self.sched
        base = {"engine": self.index, "pid": os.getpid(), "incarnation": self.incarnation}
        if s is None:
            return {**base, "state": self.phase, "for_seconds": round(time.time() - self.since, 3),
                    "weight_version": 0, "last_error": self.last_error, "sync_group": self.sync_group,
                    "running_samples": 0, "queued_requests": 0}
        phase = ("generating" if s.running else "idle") if s.phase == "ready" else s.phase
        return {**base, "state": phase, "for_seconds": round(time.time() - s.since, 3),
                "weight_version": s.version, "last_error": s.dead or s.stale or self.last_error,
                "sync_group": "broken: it forms again for the next push" if s.stale else self.sync_group,
                "running_samples": sum(len(g.todo) for g in list(s.running.values())),
                "queued_requests": len(s.queue) + len(s.parked), **s.counts}

    def watch(self, seconds: float) -> str:
        """Held open by the supervisor: it fails at once when this process dies."""
        time.sleep(seconds)
        return self.incarnation

    def probe(self) -> dict[str, Any]:
        """Liveness through the engine core (a timed round trip), or why the engine cannot serve.
        During a push or a start the core is busy by design: the push's and the start's own timeouts
        bound those, so the probe answers from the actor."""
        h = self.health()
        s = self.sched
        if s is None or s.dead or h["state"] in ("receiving", "starting"):
            return h
        if self.core.failure():
            self.loop.call_soon_threadsafe(s.die, self.core.failure())
            return {**h, "state": "dead", "last_error": self.core.failure()}
        t = self.timeouts.probe
        self._run(self.core.probe(t.seconds), t.seconds, f"probe ({t.setting})")
        return h

    # ---- requests -------------------------------------------------------------------------------

    def _tokenize(self, wire: dict[str, Any]) -> list[int]:
        tok = self.core.tokenizer
        if wire["prompt_token_ids"] is not None:
            ids = wire["prompt_token_ids"]
        elif wire["prompt"] is not None:
            ids = tok(wire["prompt"])["input_ids"]
        else:
            if not getattr(tok, "chat_template", None):
                raise ValueError("messages: the model's tokenizer has no chat template; send prompt or "
                                 "prompt_token_ids")
            text = tok.apply_chat_template(wire["messages"], tokenize=False, add_generation_prompt=True)
            ids = tok(text, add_special_tokens=False)["input_ids"]
        limit = self.core.max_model_len
        if not ids:
            raise ValueError("the prompt has no tokens; send a non-empty prompt")
        if len(ids) >= limit:
            raise ValueError(f"the prompt has {len(ids)} tokens and model.maxModelLen is {limit}; shorten it or "
                             f"raise model.maxModelLen")
        return list(ids)

    def submit(self, client: str, wires: list[dict[str, Any]]) -> str:
        """Queue requests (already checked by the client) for admission; returns at once, with this
        engine's incarnation (a restarted engine has a new one and none of the old requests)."""
        if self.sched is None:
            raise RuntimeError(f"engine {self.index} is {self.phase}, not serving")
        groups = []
        for w in wires:
            try:
                groups.append(Group(client, w["id"], self._tokenize(w), w["params"],
                                    {i: SampleState(i) for i in w["indices"]}))
            except ValueError as exc:
                self.sched.deliver(client, {"id": w["id"], "error": str(exc)})
        self.loop.call_soon_threadsafe(self.sched.enqueue, groups)
        return self.incarnation

    def poll(self, client: str, wait_s: float) -> dict[str, Any]:
        """The client's finished requests (waits up to `wait_s` for the first one), and this engine's
        incarnation."""
        if self.sched is None:
            time.sleep(min(wait_s, 0.2))
            return {"incarnation": self.incarnation, "items": [], "state": self.phase}
        return {"incarnation": self.incarnation, "items": self.sched.poll(client, wait_s)}

    def cancel(self, client: str) -> None:
        """Drop everything of `client`: queued, running and finished-but-unpolled requests."""
        if self.sched is not None:
            self._run(self.sched.cancel(client), self.timeouts.health.seconds, "cancel")

    # ---- the weight-sync group ------------------------------------------------------------------

    def join(self, host: str, port: int, world_size: int, position: int) -> list[int]:
        """Join a (new) sync group as its `position`-th engine; a former group's transport is dropped."""
        t = self.timeouts.sync
        ranks = self._run(self.core.join(host, port, position, world_size, t.seconds), t.outer,
                          f"sync group join ({t.setting})")
        self.sync_group, self.group = f"joined {host}:{port} as rank(s) {ranks}", f"{host}:{port}"
        return ranks

    def receive(self, push: Push) -> dict[str, Any]:
        """One push under `sync.inflight`: stop admitting, drain/abort/keep, receive every bucket,
        reset the prefix cache, stamp the version, admit again."""
        t = self.timeouts.sync
        push = Push.from_wire(push)
        if push.group and push.group != self.group:  # another sender formed a group with it since
            raise sync.SyncError(f"engine {self.index}: push v{push.version} comes over sync group {push.group}, but "
                                 f"the engine joined {self.group or 'none'} since; the group forms again for the next push")
        return self._run(self.sched.push(push), t.outer, f"push ({t.setting})")

    def call(self, fn: Callable, *args: Any) -> list[Any]:
        """`fn(worker, *args)` in every TP worker, one result each (benchmarks and tests)."""
        return self._run(self.core.call(fn, args), self.timeouts.sync.seconds, "call")

    # ---- the colocated layout ---------------------------------------------------------------------

    def sleep(self) -> None:
        """Before the trainer rank on this GPU trains: drain or interrupt, then vLLM sleep level 2."""
        if self.sched is None:  # not started (being replaced): it holds no KV cache to free
            return
        t = self.timeouts.health
        self._run(self.sched.sleep(), t.seconds, f"sleep ({t.setting})")

    def receive_ipc(self, msg: dict[str, Any]) -> dict[str, Any]:
        """One call of a colocated push from the trainer rank on this GPU (ipc.IpcSender)."""
        t = self.timeouts.sync
        return self._run(self.sched.push_ipc(msg), t.outer, f"colocated push ({t.setting})")
