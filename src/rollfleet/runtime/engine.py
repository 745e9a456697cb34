"""Rollout engines: one threaded Ray actor per engine, running vLLM's async engine (`AsyncLLM`) or
the CPU stand-in (standin.py, same interface) on a private asyncio loop.

* Requests are admitted as they arrive (continuous batching across steps); each of a request's `n`
  samples is one engine request with final-only output; a request's result goes to its client's
  queue when all its samples are done, for `poll` to collect.
* Every sample is stamped with the weight version at admission and at completion. A per-version
  cache salt keeps a request from ever hitting prefix-cache blocks of another version, and the
  prefix cache is reset after every push (a False result is an error).
* `sync.inflight` says what happens to requests in flight when a push arrives. Admission stops in
  every case (new requests queue here and start on the new weights), then:
  `wait`  drain: the push starts once every admitted sample finished (on the old weights);
  `abort` abort the admitted samples, push, resubmit them on the new weights (no sample mixes versions);
  `keep`  push between two scheduler steps (vLLM's engine core runs a utility call between steps),
          then reset the prefix cache preempting the running requests, whose KV vLLM recomputes
          with the new weights: their samples span the update and say so. Built from calls vLLM
          0.14.1 and 0.20.2 both have, so no version needs `pause_generation(mode="keep")`.
* `health()` reads plain attributes: it answers while a push or any generation is in flight.
* After a failed push the engine's weights are undefined: it fails its requests, refuses new ones,
  and `health()` says the sync group is broken and has to be formed again (restart the fleet).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import os
import threading
import time
from collections import deque
from typing import Any, Callable

from rollfleet.runtime import sync
from rollfleet.spec import FleetSpec, load_spec

EXTENSION = "rollfleet.runtime.ext.WeightSyncExtension"


class EngineStartError(RuntimeError):
    pass


def vllm_sampling(params: dict[str, Any], index: int) -> dict[str, Any]:
    """SamplingParams keywords for sample `index` of a request (one engine request per sample)."""
    out = {k: v for k, v in params.items() if k not in ("n", "seed", "logprobs", "stop", "stop_token_ids")}
    out.update(n=1, seed=None if params["seed"] is None else params["seed"] + index,
               logprobs=0 if params["logprobs"] else None,  # 0: the sampled token's logprob only
               stop=params["stop"] or None, stop_token_ids=params["stop_token_ids"] or None)
    return out


class VllmCore:
    """The real engine core: vLLM `AsyncLLM` with the rollfleet worker extension (executor uni / mp)."""

    kind = "vllm"

    def __init__(self, spec: FleetSpec, model: str):
        self.spec, self.model = spec, model

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
            **{"disable_log_stats": True, **v.extra_engine_args})  # stats: a default extraEngineArgs may change
        self.llm = AsyncLLM.from_engine_args(args)
        self.tokenizer = AutoTokenizer.from_pretrained(self.model, revision=spec.model.revision)
        self.max_model_len = self.llm.model_config.max_model_len

    async def generate(self, request_id: str, prompt: list[int], params: dict[str, Any], indices: list[int],
                       salt: str, on_sample: Callable[[int, dict[str, Any]], None]) -> None:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        async def one(i: int) -> None:
            sampling = SamplingParams(**vllm_sampling(params, i), output_kind=RequestOutputKind.FINAL_ONLY)
            final = None
            async for final in self.llm.generate({"prompt_token_ids": prompt, "cache_salt": salt}, sampling,
                                                 f"{request_id}-{i}"):
                pass
            c = final.outputs[0]
            logprobs = [pos[t].logprob for pos, t in zip(c.logprobs, c.token_ids)] if params["logprobs"] else None
            on_sample(i, {"token_ids": list(c.token_ids), "text": c.text, "finish_reason": c.finish_reason,
                          "logprobs": logprobs})

        async with asyncio.TaskGroup() as group:  # a failure or a cancel (abort) ends every sample
            for i in indices:
                group.create_task(one(i))

    async def join(self, host: str, port: int, engine: int, world_size: int, timeout_s: float) -> list[int]:
        return await self.llm.collective_rpc("rollfleet_join", timeout=timeout_s, args=(
            host, port, engine, self.spec.vllm.tensor_parallel_size, world_size, timeout_s))

    async def receive(self, push: sync.Push, timeout_s: float) -> list[dict[str, Any]]:
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
class Group:
    """One request on this engine: its samples still to generate and those done."""

    client: str
    id: str
    prompt: list[int]
    params: dict[str, Any]
    todo: list[int]
    admitted: dict[int, int] = dataclasses.field(default_factory=dict)  # sample -> version at admission
    samples: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)
    attempt: int = 0
    task: asyncio.Task | None = None


class Scheduler:
    """The engine's request and push logic. It runs on the engine's private loop (its coroutines and
    `enqueue`), apart from `deliver`/`poll`, which any thread may call. Kept out of EngineActor: Ray
    runs an actor with any coroutine method as an asyncio actor, whose sync methods would block
    each other and `health()`."""

    def __init__(self, index: int, spec: FleetSpec, core: Any):
        self.index, self.spec, self.core = index, spec, core
        self.version, self.failed = 0, None
        self.phase, self.since = "ready", time.time()  # ready / draining / receiving / failed
        self.admitting = True
        self.queue: deque[Group] = deque()  # waiting for admission
        self.running: dict[str, Group] = {}  # admitted
        self.idle = asyncio.Event()
        self.idle.set()
        self.results: dict[str, deque[dict[str, Any]]] = {}  # client -> finished requests
        self.cond = threading.Condition()
        self.counts = {"admitted": 0, "completed": 0, "aborted": 0}  # samples
        self.last_push: dict[str, Any] | None = None
        self.asleep = False
        self._ipc_started = 0.0

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
            if self.failed:
                self.deliver(g.client, {"id": g.id, "error": self.failed})
            else:
                self.queue.append(g)
        self.admit()

    def admit(self) -> None:
        while self.admitting and self.queue and not self.failed:
            g = self.queue.popleft()
            for i in g.todo:
                g.admitted[i] = self.version
            self.counts["admitted"] += len(g.todo)
            self.running[g.id] = g
            self.idle.clear()
            g.task = asyncio.get_running_loop().create_task(self.generate(g))

    def _finished(self, g: Group) -> None:
        self.running.pop(g.id, None)
        if not self.running:
            self.idle.set()

    async def generate(self, g: Group) -> None:
        def done(i: int, out: dict[str, Any]) -> None:
            out.update(index=i, admitted_version=g.admitted[i], completed_version=self.version)
            g.samples[i] = out
            g.todo.remove(i)
            self.counts["completed"] += 1

        try:
            await self.core.generate(f"{g.id}.{g.attempt}", g.prompt, g.params, list(g.todo),
                                     f"rollfleet-v{self.version}", done)
        except asyncio.CancelledError:
            raise  # a push (sync.inflight: abort) or cancel() took it back
        except Exception as exc:
            self._finished(g)
            self.deliver(g.client, {"id": g.id, "error": f"{type(exc).__name__}: {exc}"})
            return
        self._finished(g)
        self.deliver(g.client, {"id": g.id, "prompt_token_ids": g.prompt,
                                "samples": [g.samples[i] for i in sorted(g.samples)]})

    async def cancel(self, client: str) -> None:
        self.queue = deque(g for g in self.queue if g.client != client)
        mine = [g for g in self.running.values() if g.client == client]
        for g in mine:
            g.task.cancel()
        await asyncio.gather(*(g.task for g in mine), return_exceptions=True)
        for g in mine:
            self._finished(g)
        with self.cond:
            self.results.pop(client, None)

    # ---- a push (the loop) --------------------------------------------------------------------

    async def push(self, push: sync.Push) -> dict[str, Any]:
        if self.failed:
            raise sync.SyncError(self.failed)
        policy = push.inflight
        t0 = time.perf_counter()
        self.admitting = False
        in_flight = sum(len(g.todo) for g in self.running.values())
        aborted = 0
        if policy == "wait" and self.running:
            self.enter("draining")
            await self.idle.wait()
        elif policy == "abort" and self.running:
            groups = list(self.running.values())
            for g in groups:
                g.task.cancel()
            await asyncio.gather(*(g.task for g in groups), return_exceptions=True)
            for g in reversed(groups):  # back to the front of the queue, in admission order
                self._finished(g)
                aborted += len(g.todo)
                g.attempt += 1
                self.queue.appendleft(g)
            self.counts["aborted"] += aborted
        t_ready = time.perf_counter()
        self.enter("receiving")
        # One engine-core round trip: the reset is sent right behind the receive, and the engine core runs
        # utility calls in the order they came, so it resets the moment the last bucket is loaded.
        receive = asyncio.ensure_future(self.core.receive(push, self.spec.sync.timeout_seconds))
        reset = asyncio.ensure_future(self.core.reset_prefix_cache(reset_running_requests=policy == "keep"))
        try:
            try:
                workers = await receive
            finally:
                reset_ok = await asyncio.gather(reset, return_exceptions=True)
            t_received = time.perf_counter()
            if reset_ok[0] is not True:
                raise sync.SyncError(f"engine {self.index}: reset_prefix_cache() returned {reset_ok[0]!r} after "
                                     f"push v{push.version}; stale KV would corrupt rollouts")
        except BaseException as exc:  # an error, or the actor's own deadline cancelling us
            self._failed(push.version, exc, "and the sync group is broken: restart the fleet to form it again")
        self._finished_push(push.version)
        done = time.perf_counter()
        self.last_push = {
            "engine": self.index, "version": push.version, "policy": policy, "in_flight": in_flight,
            "aborted": aborted, "checksums": [w["checksums"] for w in workers],
            "worker_seconds": max(w["seconds"] for w in workers), "drain_seconds": t_ready - t0,
            "receive_reset_seconds": t_received - t_ready, "paused_seconds": done - t0}
        return self.last_push

    # ---- the colocated layout (the loop) ------------------------------------------------------

    async def sleep(self) -> None:
        """Free the GPU for the trainer: stop admitting, drain, vLLM sleep level 2 (weights and KV
        discarded: the next push replaces the weights). Requests that arrive meanwhile wait for it."""
        self.admitting = False
        if self.running:
            self.enter("draining")
            await self.idle.wait()
        if not self.asleep:
            await self.core.sleep(2)
            self.asleep = True
        self.enter("asleep")

    async def push_ipc(self, msg: dict[str, Any]) -> dict[str, Any]:
        """One call of a colocated push (ipc.IpcSender): the first wakes the weights, every call loads
        what it carries, the last wakes the KV cache, resets the prefix cache and stamps the version."""
        if self.failed:
            raise sync.SyncError(self.failed)
        try:
            if msg["first"]:
                self._ipc_started = time.perf_counter()
                self.admitting = False
                if self.running:
                    self.enter("draining")
                    await self.idle.wait()
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
                if not await self.core.reset_prefix_cache():
                    raise sync.SyncError(f"engine {self.index}: reset_prefix_cache() returned False after push "
                                         f"v{msg['version']}; stale KV would corrupt rollouts")
                self._finished_push(msg["version"])
                ack.update(version=msg["version"], policy="wait", wake_reset_seconds=time.perf_counter() - t1,
                           paused_seconds=time.perf_counter() - self._ipc_started)
                self.last_push = ack
            return ack
        except BaseException as exc:
            self._failed(msg["version"], exc, "restart the fleet")

    def _finished_push(self, version: int) -> None:
        """The new weights are in and the prefix cache is reset: stamp the version, admit again."""
        self.version = version
        self.admitting = True
        self.enter("ready")
        self.admit()

    def _failed(self, version: int, exc: BaseException, fix: str) -> None:
        """A push failed: fail the engine (its weights are undefined) and raise one error saying so."""
        reason = f"engine {self.index}: push v{version} failed ({type(exc).__name__}: {exc}); its weights are undefined; {fix}"
        self.fail(reason)
        if isinstance(exc, Exception):
            raise sync.SyncError(reason) from None
        raise exc

    def fail(self, reason: str) -> None:
        """After a failed push: fail every request, refuse new ones, report the broken group."""
        self.failed = reason
        self.enter("failed")
        for g in [*self.running.values(), *self.queue]:
            if g.task is not None:
                g.task.cancel()
            self.deliver(g.client, {"id": g.id, "error": reason})
        self.running.clear()
        self.queue.clear()
        self.idle.set()


class EngineActor:
    """One rollout engine. Create with `ray.remote(EngineActor).options(max_concurrency=32, ...)`:
    Ray runs its methods on separate threads, so `health()` never waits for the others."""

    def __init__(self, spec_json: dict[str, Any], index: int, model: str, devices: list[str] | None = None):
        if devices is not None:  # colocated: the GPU(s) of this engine's trainer rank (before any CUDA use)
            os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, devices))
        self.spec = load_spec(spec_json)
        self.index, self.model = index, model
        self.core: Any = None
        self.sched: Scheduler | None = None
        self.phase, self.since = "created", time.time()  # before the scheduler exists
        self.last_error = None
        self.sync_group = "not joined"
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
        from rollfleet.runtime.standin import StandinCore

        self._enter("starting")
        try:
            core = (VllmCore if self.spec.engine == "vllm" else StandinCore)(self.spec, self.model)
            self._run(core.start(), self.spec.timeouts.init_seconds, "start (timeouts.initSeconds)")
        except Exception as exc:  # translated into the fix the user needs
            self.last_error = f"{type(exc).__name__}: {exc}"
            self._enter("failed")
            raise _start_error(self.spec, self.index, exc) from None
        self.core = core
        self.sched = Scheduler(self.index, self.spec, core)
        import ray

        return {"engine": self.index, "kind": core.kind, "node": ray.util.get_node_ip_address(),
                "gpus": ray.get_gpu_ids() if ray.is_initialized() else [], "pid": os.getpid()}

    def stop(self) -> None:
        """Release the engine (vLLM shuts its engine-core process down)."""
        if self.core is not None:
            try:
                self._run(self.core.shutdown(), 60, "shutdown")
            finally:
                self.core = None
        self._enter("stopped")
        self.sched = None

    def health(self) -> dict[str, Any]:
        """Never waits for the loop or the engine: answers while a push or generation is in flight."""
        s = self.sched
        if s is None:
            return {"engine": self.index, "pid": os.getpid(), "state": self.phase,
                    "for_seconds": round(time.time() - self.since, 3),
                    "weight_version": 0, "last_error": self.last_error, "sync_group": self.sync_group,
                    "running_samples": 0, "queued_requests": 0}
        phase = ("generating" if s.running else "idle") if s.phase == "ready" else s.phase
        return {"engine": self.index, "pid": os.getpid(), "state": phase, "for_seconds": round(time.time() - s.since, 3),
                "weight_version": s.version, "last_error": s.failed or self.last_error,
                "sync_group": "broken: form it again (restart the fleet)" if s.failed else self.sync_group,
                "running_samples": sum(len(g.todo) for g in list(s.running.values())),
                "queued_requests": len(s.queue), **s.counts}

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
        if len(ids) >= limit:
            raise ValueError(f"the prompt has {len(ids)} tokens and model.maxModelLen is {limit}; shorten it or "
                             f"raise model.maxModelLen")
        return list(ids)

    def submit(self, client: str, wires: list[dict[str, Any]]) -> int:
        """Queue requests (already checked by the client) for admission; returns at once."""
        groups = []
        for w in wires:
            try:
                groups.append(Group(client, w["id"], self._tokenize(w), w["params"], list(w["indices"])))
            except ValueError as exc:
                self.sched.deliver(client, {"id": w["id"], "error": str(exc)})
        self.loop.call_soon_threadsafe(self.sched.enqueue, groups)
        return len(groups)

    def poll(self, client: str, wait_s: float) -> list[dict[str, Any]]:
        """The client's finished requests; waits up to `wait_s` for the first one."""
        return self.sched.poll(client, wait_s)

    def cancel(self, client: str) -> None:
        """Drop everything of `client`: queued, running and finished-but-unpolled requests."""
        self._run(self.sched.cancel(client), self.spec.timeouts.health_seconds, "cancel")

    # ---- the weight-sync group ------------------------------------------------------------------

    def join(self, host: str, port: int, world_size: int) -> list[int]:
        t = self.spec.sync.timeout_seconds
        ranks = self._run(self.core.join(host, port, self.index, world_size, t), t + 5,
                          "sync group join (sync.timeoutSeconds)")
        self.sync_group = f"joined as rank(s) {ranks}"
        return ranks

    def receive(self, push: sync.Push) -> dict[str, Any]:
        """One push under `sync.inflight`: stop admitting, drain/abort/keep, receive every bucket,
        reset the prefix cache, stamp the version, admit again."""
        t = self.spec.sync.timeout_seconds
        return self._run(self.sched.push(sync.Push.from_wire(push)), t + 5, "push (sync.timeoutSeconds)")

    def call(self, fn: Callable, *args: Any) -> list[Any]:
        """`fn(worker, *args)` in every TP worker, one result each (benchmarks and tests)."""
        return self._run(self.core.call(fn, args), self.spec.sync.timeout_seconds, "call")

    # ---- the colocated layout ---------------------------------------------------------------------

    def sleep(self) -> None:
        """Before the trainer rank on this GPU trains: drain, then vLLM sleep level 2."""
        t = self.spec.timeouts.health_seconds
        self._run(self.sched.sleep(), t, "sleep (timeouts.healthSeconds)")

    def receive_ipc(self, msg: dict[str, Any]) -> dict[str, Any]:
        """One call of a colocated push from the trainer rank on this GPU (ipc.IpcSender)."""
        t = self.spec.sync.timeout_seconds
        return self._run(self.sched.push_ipc(msg), t + 5, "colocated push (sync.timeoutSeconds)")
