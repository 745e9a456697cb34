"""Rollout engines: one Ray actor per engine, holding vLLM (GPU) or the CPU stand-in.

`EngineActor` is a threaded actor: `generate`, `join` and `receive` take the engine lock (vLLM's LLM is
not thread-safe), while `health` never does, so it answers during a push or a long generate (the
open-instruct hangs #1454/#1480 came from health checks queued behind a weight update).

In-flight policy during a push: a generate call that started before the push finishes on the old
weights and its outputs carry the old version; the push starts after it; generate calls made during
the push run after it, on the new weights. Nothing is aborted.
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from rollfleet.runtime import sync
from rollfleet.spec import FleetSpec, load_spec

EXTENSION = "rollfleet.runtime.ext.WeightSyncExtension"


class EngineStartError(RuntimeError):
    pass


def sampling_defaults(params: dict[str, Any] | None) -> dict[str, Any]:
    out = {"n": 1, "temperature": 0.0, "top_p": 1.0, "max_tokens": 32, "seed": None}
    unknown = set(params or {}) - set(out)
    if unknown:
        raise ValueError(f"sampling params {sorted(unknown)} not supported; use {sorted(out)}")
    return {**out, **(params or {})}


class VllmEngine:
    """The real engine: vLLM `LLM` with the rollfleet worker extension (executor uni / mp)."""

    kind = "vllm"

    def __init__(self, spec: FleetSpec, model: str):
        from vllm import LLM

        v, tp = spec.vllm, spec.vllm.tensor_parallel_size
        self.spec = spec
        optional = {"revision": spec.model.revision, "max_model_len": spec.model.max_model_len,
                    "max_num_seqs": v.max_num_seqs}
        self.llm = LLM(
            model=model, tokenizer=model, dtype=spec.model.dtype, seed=v.seed,
            tensor_parallel_size=tp, gpu_memory_utilization=v.gpu_memory_utilization,
            enable_prefix_caching=v.enable_prefix_caching, enforce_eager=v.enforce_eager,
            # never "ray" inside a Ray actor (vllm#30016): an engine stays on one node
            distributed_executor_backend="uni" if tp == 1 else "mp",
            worker_extension_cls=EXTENSION, **{k: x for k, x in optional.items() if x is not None},
            **v.extra_engine_args,
        )

    def generate(self, prompts: list[str], params: dict[str, Any]) -> list[list[dict[str, Any]]]:
        from vllm import SamplingParams

        outs = self.llm.generate(prompts, SamplingParams(**params), use_tqdm=False)
        return [[{"text": c.text, "token_ids": list(c.token_ids)} for c in o.outputs] for o in outs]

    def join(self, host: str, port: int, engine: int, world_size: int, timeout_s: float) -> list[int]:
        return self.llm.collective_rpc("rollfleet_join", timeout=timeout_s, args=(
            host, port, engine, self.spec.vllm.tensor_parallel_size, world_size, timeout_s))

    def receive(self, plan: sync.Plan, timeout_s: float) -> list[dict[str, Any]]:
        """Per TP worker: {"checksums": [...], "seconds": receive time inside the worker}."""
        return self.llm.collective_rpc("rollfleet_receive", timeout=timeout_s, args=(plan.to_wire(), timeout_s))

    def reset_prefix_cache(self) -> bool:
        return bool(self.llm.reset_prefix_cache())

    def raw_broadcast(self, nbytes: int, iters: int, timeout_s: float) -> list[float]:
        return self.llm.collective_rpc("rollfleet_raw_broadcast", timeout=timeout_s, args=(nbytes, iters, timeout_s))

    def param_sums(self, names: list[str]) -> list[dict[str, float]]:
        return self.llm.collective_rpc("rollfleet_param_sums", args=(names,))


class StandinEngine:
    """CPU STAND-IN for vLLM (HF transformers `generate`), for machines without GPUs.

    Same receive path as the vLLM worker extension (`sync.receive` handing bucket views to
    `load_weights`), over gloo instead of NCCL. Its "prefix cache" memoizes greedy outputs per
    prompt, which goes stale on a weight update exactly like vLLM's KV prefix cache would.
    """

    kind = "cpu-standin"

    def __init__(self, spec: FleetSpec, model: str):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        torch.set_num_threads(1)
        self.spec = spec
        self.tokenizer = AutoTokenizer.from_pretrained(model, revision=spec.model.revision)
        self.tokenizer.padding_side = "left"
        dtype = getattr(torch, spec.model.dtype) if spec.model.dtype != "auto" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(model, revision=spec.model.revision, dtype=dtype).eval()
        self.params = dict(self.model.named_parameters())
        self.prefix_cache: dict[tuple, list[dict[str, Any]]] = {}
        self.transport: sync.Transport | None = None

    def generate(self, prompts: list[str], params: dict[str, Any]) -> list[list[dict[str, Any]]]:
        import torch

        greedy = params["temperature"] == 0
        results: list[list[dict[str, Any]] | None] = [None] * len(prompts)
        todo = []
        for i, p in enumerate(prompts):
            key = (p, params["max_tokens"], params["n"])
            if greedy and key in self.prefix_cache:
                results[i] = self.prefix_cache[key]
            else:
                todo.append(i)
        if todo:
            batch = self.tokenizer([prompts[i] for i in todo], return_tensors="pt", padding=True)
            if params["seed"] is not None:
                torch.manual_seed(params["seed"])
            with torch.no_grad():
                out = self.model.generate(
                    **batch, max_new_tokens=params["max_tokens"], min_new_tokens=params["max_tokens"],
                    do_sample=not greedy, temperature=params["temperature"] if not greedy else None,
                    top_p=params["top_p"] if not greedy else None, num_return_sequences=params["n"],
                    pad_token_id=self.tokenizer.pad_token_id)
            new = out[:, batch["input_ids"].shape[1]:]
            for j, i in enumerate(todo):
                rows = new[j * params["n"]:(j + 1) * params["n"]]
                results[i] = [{"text": self.tokenizer.decode(r, skip_special_tokens=True),
                               "token_ids": r.tolist()} for r in rows]
                if greedy:
                    self.prefix_cache[(prompts[i], params["max_tokens"], params["n"])] = results[i]
        return results  # type: ignore[return-value]

    def join(self, host: str, port: int, engine: int, world_size: int, timeout_s: float) -> list[int]:
        import torch

        rank = sync.rank_of(engine, 0, 1)
        self.transport = sync.join("gloo", host, port, rank, world_size, torch.device("cpu"), timeout_s)
        return [rank]

    def load_weights(self, weights: list[tuple[str, Any]]) -> None:
        for name, tensor in weights:
            if name not in self.params:
                raise KeyError(f"weight {name!r} is not a parameter of this model")
            self.params[name].data.copy_(tensor)

    def receive(self, plan: sync.Plan, timeout_s: float) -> list[dict[str, Any]]:
        t0 = time.perf_counter()
        sums = sync.receive(plan, self.transport, self.load_weights, time.monotonic() + timeout_s)
        return [{"checksums": sums, "seconds": time.perf_counter() - t0}]

    def reset_prefix_cache(self) -> bool:
        self.prefix_cache.clear()
        return True

    def raw_broadcast(self, nbytes: int, iters: int, timeout_s: float) -> list[float]:
        return [sync.raw_broadcast(self.transport, nbytes, iters, time.monotonic() + timeout_s)]

    def param_sums(self, names: list[str]) -> list[dict[str, float]]:
        return [{n: float(self.params[n].detach().double().sum()) for n in names if n in self.params}]


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


class EngineActor:
    """One rollout engine. Create with `ray.remote(EngineActor).options(max_concurrency=4, ...)`."""

    def __init__(self, spec_json: dict[str, Any], index: int, model: str):
        self.spec = load_spec(spec_json)
        self.index, self.model = index, model
        self.engine: VllmEngine | StandinEngine | None = None
        self.lock = threading.Lock()
        self.state, self.since = "created", time.time()
        self.version, self.last_error = 0, None

    def _enter(self, state: str) -> None:
        self.state, self.since = state, time.time()

    def start(self) -> dict[str, Any]:
        with self.lock:
            self._enter("starting")
            try:
                cls = VllmEngine if self.spec.engine == "vllm" else StandinEngine
                self.engine = cls(self.spec, self.model)
            except Exception as exc:  # translated into the fix the user needs
                self.last_error = str(exc)
                self._enter("failed")
                raise _start_error(self.spec, self.index, exc) from None
            self._enter("idle")
            import ray

            return {"engine": self.index, "kind": self.engine.kind, "node": ray.util.get_node_ip_address(),
                    "gpus": ray.get_gpu_ids(), "pid": os.getpid()}

    def generate(self, prompts: list[str], params: dict[str, Any] | None = None) -> list[list[dict[str, Any]]]:
        params = sampling_defaults(params)
        with self.lock:
            self._enter("generating")
            try:
                outs = self.engine.generate(prompts, params)
                for samples in outs:
                    for s in samples:
                        s["weight_version"], s["engine"] = self.version, self.index
                return outs
            finally:
                self._enter("idle")

    def join(self, host: str, port: int, world_size: int) -> list[int]:
        with self.lock:
            self._enter("joining")
            try:
                return self.engine.join(host, port, self.index, world_size, self.spec.sync.timeout_seconds)
            finally:
                self._enter("idle")

    def receive(self, plan: sync.Plan, finalize: bool = True) -> dict[str, Any]:
        """One push: receive every bucket, load, reset the prefix cache (a False result is an error).
        `finalize=False` skips the reset and the version bump (the per-tensor baseline in bench)."""
        t0 = time.perf_counter()
        with self.lock:
            t_locked = time.perf_counter()
            self._enter("receiving")
            try:
                workers = self.engine.receive(plan, self.spec.sync.timeout_seconds)
                t_received = time.perf_counter()
                ack = {"engine": self.index, "checksums": [w["checksums"] for w in workers],
                       "worker_seconds": max(w["seconds"] for w in workers), "lock_wait_seconds": t_locked - t0,
                       "receive_rpc_seconds": t_received - t_locked}
                if not finalize:
                    return {**ack, "version": self.version, "prefix_reset": None}
                if not self.engine.reset_prefix_cache():
                    raise sync.SyncError(f"engine {self.index}: reset_prefix_cache() returned False after push "
                                         f"v{plan.version}; stale KV would corrupt rollouts")
                self.version = plan.version
            except Exception as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
                raise
            finally:
                self._enter("idle")
        return {**ack, "version": plan.version, "prefix_reset": True, "reset_seconds": time.perf_counter() - t_received,
                "seconds": time.perf_counter() - t0}

    def param_sums(self, names: list[str]) -> list[dict[str, float]]:
        with self.lock:
            return self.engine.param_sums(names)

    def raw_broadcast(self, nbytes: int, iters: int) -> list[float]:
        """Benchmark ceiling: raw broadcasts on the sync group (every TP worker joins)."""
        with self.lock:
            return self.engine.raw_broadcast(nbytes, iters, self.spec.sync.timeout_seconds)

    def stop(self) -> None:
        """Release the engine (vLLM shuts its engine-core process down when the client is collected)."""
        import gc

        with self.lock:
            self.engine = None
            self._enter("stopped")
        gc.collect()

    def health(self) -> dict[str, Any]:
        """Never takes the engine lock: answers while a push or generate is in flight."""
        return {"engine": self.index, "state": self.state, "for_seconds": round(time.time() - self.since, 3),
                "weight_version": self.version, "last_error": self.last_error}
