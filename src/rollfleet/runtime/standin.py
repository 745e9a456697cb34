"""The CPU STAND-IN for vLLM's async engine: HF transformers on CPU, for machines without GPUs.

It has the engine-core interface `engine.py` drives (`VllmCore` is the real one), and behaves like
vLLM where the runtime's semantics depend on it:
* continuous batching: requests join and finish at any scheduler step; one step = one token for
  every running request (each request's `n` samples decode as one batch with their own RNGs);
* a prefix cache (the prompt's KV, keyed by cache salt + prompt) that goes stale on a weight update
  until `reset_prefix_cache()`, which returns False while requests run unless they are preempted
  (`reset_running_requests=True`: their KV is recomputed with the new weights, as vLLM does);
* a weight load never overlaps a scheduler step (vLLM's engine core runs a utility call between
  steps): the loop pauses while `receive` runs;
* `abort(key)` ends a request's samples between two steps with the tokens they have, as vLLM's abort
  output does (the engine interrupts requests this way for `sync.inflight` abort and keep);
* vLLM's sampling parameters and defaults, its raw logprobs, its finish reasons.
Weights arrive through the same `sync.receive` as the vLLM worker extension, over gloo.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import inspect
import json
import os
import time
from collections import OrderedDict
from typing import Any, Callable

import torch

from rollfleet.runtime import ipc, metrics, sync
from rollfleet.runtime.push import Push

PREFIX_ENTRIES = 256  # prompts whose KV the stand-in keeps (LRU)


@dataclasses.dataclass(eq=False)
class Cohort:
    """One request's samples decoding together (rows = sample indices still running)."""

    request_id: str
    prompt: list[int]
    params: dict[str, Any]
    rows: list[int]
    salt: str
    on_sample: Callable[[int, dict[str, Any]], None]
    done: asyncio.Future
    tokens: list[list[int]] = dataclasses.field(default_factory=list)
    logprobs: list[list[float]] = dataclasses.field(default_factory=list)
    generators: list[torch.Generator | None] = dataclasses.field(default_factory=list)
    cache: Any = None
    last_logits: torch.Tensor | None = None
    recompute: bool = False
    arrived: float = dataclasses.field(default_factory=time.monotonic)


def _forward(model, ids: torch.Tensor, cache=None):
    """Last-position logits and the KV cache (transformers 5 calls the cache argument `cache`,
    4.x `past_key_values`)."""
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    out = model(input_ids=ids, use_cache=True, **{key: cache})
    return out.logits[:, -1].float(), out[key]


class StandinCore:
    """CPU STAND-IN engine core (HF transformers), labelled as such wherever it runs."""

    kind = "cpu-standin"

    def __init__(self, spec, model: str):
        self.spec, self.model_path = spec, model
        self.running: list[Cohort] = []
        self.waiting: list[Cohort] = []
        self.prefix: OrderedDict[tuple, tuple[torch.Tensor, Any]] = OrderedDict()
        self.paused = False
        self.transport: sync.Transport | None = None
        self.max_num_seqs = spec.vllm.max_num_seqs or 256
        self.tags = {"model_name": spec.model.name, "engine": 0}  # vLLM's labels (metrics.VLLM)

    async def start(self) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer, logging as hf_logging

        hf_logging.set_verbosity_error()
        torch.set_num_threads(1)
        spec = self.spec
        self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, revision=spec.model.revision)
        dtype = getattr(torch, spec.model.dtype) if spec.model.dtype != "auto" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(self.model_path, revision=spec.model.revision,
                                                          dtype=dtype).eval()
        self.params = dict(self.model.named_parameters())
        self.max_model_len = spec.model.max_model_len or self.model.config.max_position_embeddings
        self.vocab_size = self.model.config.vocab_size
        self.eos = self.tokenizer.eos_token_id
        self._wake = asyncio.Event()
        self._utility = asyncio.Lock()  # like vLLM's engine core: utility calls run one at a time, in order
        self._loop_task = asyncio.get_running_loop().create_task(self._loop())

    # ---- requests -------------------------------------------------------------------------------

    async def generate(self, key: str, jobs: list[tuple[int, list[int], dict[str, Any]]], salt: str,
                       on_sample: Callable[[int, dict[str, Any]], None]) -> None:
        """Decode each job (sample index, prompt token ids, sampling params); `on_sample(index, output)`
        as each finishes, or (after `abort(key)`) with the tokens it had and finish_reason "abort".
        Jobs with the same prompt and params decode as one batch (a request's fresh samples)."""
        loop = asyncio.get_running_loop()
        batches: dict[tuple, list[tuple[int, list[int], dict[str, Any]]]] = {}
        for job in jobs:
            batches.setdefault((tuple(job[1]), json.dumps(job[2], sort_keys=True)), []).append(job)
        cohorts = []
        for batch in batches.values():
            prompt, params = batch[0][1], batch[0][2]
            seed = params["seed"]
            rows = [index for index, _, _ in batch]
            cohorts.append(Cohort(key, list(prompt), params, rows, salt, on_sample, loop.create_future(),
                                  tokens=[[] for _ in rows], logprobs=[[] for _ in rows],
                                  generators=[torch.Generator().manual_seed(seed + i) if seed is not None else None
                                              for i in rows]))
        self.waiting.extend(cohorts)
        self._wake.set()
        try:
            await asyncio.gather(*(c.done for c in cohorts))
        finally:  # finished, failed, interrupted or cancelled: it leaves the scheduler either way
            for c in cohorts:
                for queue in (self.waiting, self.running):
                    if c in queue:
                        queue.remove(c)

    async def abort(self, key: str) -> None:
        """Interrupt `key`'s samples between two steps: each ends with the tokens it has."""
        for c in [c for c in (*self.running, *self.waiting) if c.request_id == key and not c.done.done()]:
            for r, index in enumerate(c.rows):
                c.on_sample(index, {"token_ids": list(c.tokens[r]), "finish_reason": "abort",
                                    "text": self.tokenizer.decode(c.tokens[r],
                                                                  skip_special_tokens=c.params["skip_special_tokens"]),
                                    "logprobs": list(c.logprobs[r]) if c.params["logprobs"] else None})
            c.done.set_result(None)

    def failure(self) -> str | None:
        """Why the scheduler loop is gone, or None while it runs."""
        if not self._loop_task.done() or self._loop_task.cancelled():
            return None
        exc = self._loop_task.exception()
        return f"the stand-in's scheduler loop ended ({type(exc).__name__}: {exc})" if exc else "the loop ended"

    async def probe(self, timeout_s: float) -> list[int]:
        """A round trip through the scheduler's loop (what collective_rpc is for vLLM)."""
        await asyncio.sleep(0)
        if self.failure():
            raise RuntimeError(self.failure())
        return [os.getpid()]

    async def _loop(self) -> None:
        while True:
            if self.paused or not (self.running or self.waiting):
                self._wake.clear()
                await self._wake.wait()
                continue
            while self.waiting and sum(len(c.rows) for c in self.running) + len(self.waiting[0].rows) \
                    <= max(self.max_num_seqs, len(self.waiting[0].rows)):
                self.running.append(self.waiting.pop(0))
            metrics.set("vllm_num_requests_running", sum(len(c.rows) for c in self.running), **self.tags)
            metrics.set("vllm_num_requests_waiting", sum(len(c.rows) for c in self.waiting), **self.tags)
            for cohort in list(self.running):
                if cohort.done.done():
                    continue
                try:
                    with torch.inference_mode():  # no autograd bookkeeping: ~20 % less per decode step
                        self._step(cohort)
                except Exception as exc:  # delivered to the request, the loop goes on
                    cohort.done.set_exception(exc)
            await asyncio.sleep(0)

    def _step(self, c: Cohort) -> None:
        rows = len(c.rows)
        if c.cache is None or c.recompute:
            if c.recompute or any(c.tokens):  # preempted: recompute every row's KV on the current weights
                ids = torch.tensor([c.prompt + t for t in c.tokens])
                c.last_logits, c.cache = _forward(self.model, ids)
            else:
                c.last_logits, c.cache = self._prefill(c)
            c.recompute = False
        else:
            last = torch.tensor([[t[-1]] for t in c.tokens])
            c.last_logits, c.cache = _forward(self.model, last, c.cache)
        chosen, logprobs = self._sample(c)
        metrics.inc("vllm_generation_tokens", rows, **self.tags)
        finished = []
        for r in range(rows):
            c.tokens[r].append(int(chosen[r]))
            c.logprobs[r].append(float(logprobs[r]))
            out = self._finished(c, r)
            if out:
                c.on_sample(c.rows[r], out)
                finished.append(r)
        if finished:
            keep = [r for r in range(rows) if r not in finished]
            if not keep:
                metrics.observe("vllm_e2e_request_latency_seconds", time.monotonic() - c.arrived, **self.tags)
                c.done.set_result(None)
                return
            c.cache.batch_select_indices(torch.tensor(keep))
            c.last_logits = c.last_logits[keep]
            for name in ("rows", "tokens", "logprobs", "generators"):
                setattr(c, name, [getattr(c, name)[r] for r in keep])

    def _prefill(self, c: Cohort) -> tuple[torch.Tensor, Any]:
        key = (c.salt, tuple(c.prompt))
        metrics.inc("vllm_prefix_cache_queries", len(c.prompt), **self.tags)
        if key in self.prefix:  # a hit serves whatever KV is cached, stale or not (like vLLM)
            metrics.inc("vllm_prefix_cache_hits", len(c.prompt), **self.tags)
            self.prefix.move_to_end(key)
            logits, cache = self.prefix[key]
        else:
            logits, cache = _forward(self.model, torch.tensor([c.prompt]))
            metrics.inc("vllm_prompt_tokens", len(c.prompt), **self.tags)
            if self.spec.vllm.enable_prefix_caching:
                self.prefix[key] = (logits, copy.deepcopy(cache))
                while len(self.prefix) > PREFIX_ENTRIES:
                    self.prefix.popitem(last=False)
                metrics.set("vllm_kv_cache_usage_perc", len(self.prefix) / PREFIX_ENTRIES, **self.tags)
        cache = copy.deepcopy(cache)
        cache.batch_repeat_interleave(len(c.rows))
        return logits.repeat(len(c.rows), 1), cache

    def _sample(self, c: Cohort) -> tuple[torch.Tensor, torch.Tensor]:
        from transformers.generation import logits_process as lp

        p = c.params
        raw = c.last_logits
        logprobs_all = torch.log_softmax(raw, -1)  # vLLM's default: raw logprobs
        scores = raw.clone()
        produced = len(c.tokens[0])
        if produced < p["min_tokens"]:
            banned = [t for t in [self.eos, *p["stop_token_ids"]] if t is not None]
            scores[:, banned] = -float("inf")
        if p["repetition_penalty"] != 1.0:
            seqs = torch.tensor([c.prompt + t for t in c.tokens])
            scores = lp.RepetitionPenaltyLogitsProcessor(p["repetition_penalty"])(seqs, scores)
        if p["temperature"] == 0:
            chosen = scores.argmax(-1)
        else:
            scores = lp.TemperatureLogitsWarper(p["temperature"])(None, scores)
            if p["top_k"] > 0:
                scores = lp.TopKLogitsWarper(p["top_k"])(None, scores)
            if p["top_p"] < 1.0:
                scores = lp.TopPLogitsWarper(p["top_p"])(None, scores)
            if p["min_p"] > 0:
                scores = lp.MinPLogitsWarper(p["min_p"])(None, scores)
            probs = torch.softmax(scores, -1)
            chosen = torch.stack([torch.multinomial(probs[r], 1, generator=g)[0]
                                  for r, g in enumerate(c.generators)])
        return chosen, logprobs_all.gather(-1, chosen[:, None])[:, 0]

    def _finished(self, c: Cohort, r: int) -> dict[str, Any] | None:
        p, tokens = c.params, c.tokens[r]
        reason = None
        text = None
        if len(tokens) >= p["min_tokens"]:
            if (tokens[-1] == self.eos and not p["ignore_eos"]) or tokens[-1] in p["stop_token_ids"]:
                reason = "stop"
            elif p["stop"]:
                text = self.tokenizer.decode(tokens, skip_special_tokens=p["skip_special_tokens"])
                hits = [(text.find(s), s) for s in p["stop"] if s in text]
                if hits:
                    at, stop = min(hits)
                    text = text[:at + len(stop)] if p["include_stop_str_in_output"] else text[:at]
                    reason = "stop"
        if reason is None and (len(tokens) >= p["max_tokens"] or len(c.prompt) + len(tokens) >= self.max_model_len):
            reason = "length"
        if reason is None:
            return None
        if text is None:
            text = self.tokenizer.decode(tokens, skip_special_tokens=p["skip_special_tokens"])
        return {"token_ids": list(tokens), "text": text, "finish_reason": reason,
                "logprobs": list(c.logprobs[r]) if p["logprobs"] else None}

    # ---- weights --------------------------------------------------------------------------------

    async def join(self, host: str, port: int, position: int, world_size: int, timeout_s: float) -> list[int]:
        rank = sync.rank_of(position, 0, 1)
        sync.retire(self.transport)  # a former group (formed again after a fault)
        self.transport = await asyncio.to_thread(sync.join, "gloo", host, port, rank, world_size,
                                                 torch.device("cpu"), timeout_s)
        return [rank]

    def load_weights(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        with torch.no_grad():
            for name, tensor in weights:
                if name not in self.params:
                    raise KeyError(f"weight {name!r} is not a parameter of this model")
                self.params[name].copy_(tensor)

    async def receive(self, push: Push, timeout_s: float) -> list[dict[str, Any]]:
        """Receive one push into the model; the scheduler does not step meanwhile."""
        async with self._utility:
            return await self._receive(push, timeout_s)

    async def _receive(self, push: Push, timeout_s: float) -> list[dict[str, Any]]:
        self.paused = True
        try:
            t0 = time.perf_counter()
            sums = await asyncio.to_thread(sync.receive, push, self.transport, self.load_weights,
                                           time.monotonic() + timeout_s)
            return [{"checksums": sums, "seconds": time.perf_counter() - t0}]
        finally:
            self.paused = False
            self._wake.set()

    async def reset_prefix_cache(self, reset_running_requests: bool = False) -> bool:
        async with self._utility:
            return self._reset(reset_running_requests)

    def _reset(self, reset_running_requests: bool) -> bool:
        if self.running and not reset_running_requests:
            return False  # vLLM: blocks still in use
        self.prefix.clear()
        for c in self.running:
            c.recompute = True
        return True

    async def sleep(self, level: int) -> None:
        """vLLM's sleep: level 1+ drops the KV (the prefix cache); level 2 also discards the weights
        (zeroed here: a wake without a load would generate from garbage, as vLLM would)."""
        self.prefix.clear()
        if level >= 2:
            with torch.no_grad():
                for p in self.params.values():
                    p.zero_()

    async def wake_up(self, tags: list[str]) -> None:
        """The memory was never given back on CPU: nothing to allocate."""

    async def load_ipc(self, msg: dict[str, Any]) -> list[dict[str, Any]]:
        """One colocated handoff call (ipc.load) from shared memory; the scheduler does not step meanwhile."""
        self.paused = True
        try:
            cache = self.__dict__.setdefault("ipc_cache", {})
            return [await asyncio.to_thread(ipc.load, msg, cache, self.load_weights)]
        finally:
            self.paused = False
            self._wake.set()

    async def call(self, fn: Callable, args: tuple) -> list[Any]:
        """Run `fn(self, *args)` as vLLM's collective_rpc runs a callable in each worker (one here)."""
        return [fn(self, *args)]

    async def shutdown(self) -> None:
        self._loop_task.cancel()
