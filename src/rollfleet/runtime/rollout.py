"""Asynchronous rollout collection, the trainer's side: submit requests, take results as they finish.

```python
rollouts = fleet.rollouts()                       # one client: its own queue on every engine
rollouts.submit([Request(prompt_token_ids=ids, params={"n": 8, "temperature": 1.0}, tag=row)])
for completion in rollouts.results(): ...        # in completion order, each group complete
batch = rollouts.take(64, version=policy_version)  # 64 groups, none staler than rollout.maxStaleness
completions = fleet.generate(prompts, params)     # blocking, in prompt order (a private client)
```

* A request is one prompt (token ids, text, or chat messages rendered with the model's chat template)
  and its sampling parameters; its `n` samples stay on one engine, so the prefix is cached once.
  Requests go to the engine with the fewest samples in flight from this client.
* Backpressure: at most `rollout.queueSize` samples may be outstanding (submitted, not yet taken);
  `submit` blocks beyond that, so a slow trainer slows submission instead of growing memory.
* Staleness: `take(count, version)` never returns a group admitted more than `rollout.maxStaleness`
  versions before `version` (the policy version the batch trains); such a group is resubmitted on
  the current weights and counted in `stats["stale_resubmitted"]`.
* An engine that dies while it holds requests is an error naming it; requests are not re-routed
  (engines are not restarted, as in open-instruct: restart the fleet).
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
import uuid
from collections import deque
from typing import Any, Iterable, Iterator

# vLLM's SamplingParams defaults (0.14.1 and 0.20.2 agree); the CPU stand-in honours the same.
SAMPLING_DEFAULTS: dict[str, Any] = {
    "n": 1, "temperature": 1.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0, "max_tokens": 16, "min_tokens": 0,
    "stop": [], "stop_token_ids": [], "seed": None, "logprobs": False, "repetition_penalty": 1.0,
    "ignore_eos": False, "include_stop_str_in_output": False, "skip_special_tokens": True,
}
POLL_SECONDS = 1.0  # an engine answers a poll at once when results are ready, else after this


class RolloutError(RuntimeError):
    """A rollout failed: the message names the engine or request and what to change."""


def _number(key: str, value: Any, integer: bool, low: float, high: float | None = None,
            low_open: bool = False) -> None:
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        raise ValueError(f"sampling param {key}: {value!r} is not {'an integer' if integer else 'a number'}")
    if value < low or (low_open and value == low) or (high is not None and value > high):
        bounds = f"{'>' if low_open else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
        raise ValueError(f"sampling param {key}: {value!r} must be {bounds}")


def sampling_params(params: dict[str, Any] | None) -> dict[str, Any]:
    """`params` checked and completed with vLLM's defaults. ValueError names the key and the fix."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(SAMPLING_DEFAULTS))
    if unknown:
        raise ValueError(f"sampling params {unknown} not supported; supported: {', '.join(SAMPLING_DEFAULTS)}")
    out = {**SAMPLING_DEFAULTS, **params}
    _number("n", out["n"], True, 1)
    _number("temperature", out["temperature"], False, 0)
    _number("top_p", out["top_p"], False, 0, 1, low_open=True)
    _number("top_k", out["top_k"], True, -1)
    _number("min_p", out["min_p"], False, 0, 1)
    _number("max_tokens", out["max_tokens"], True, 1)
    _number("min_tokens", out["min_tokens"], True, 0, out["max_tokens"])
    _number("repetition_penalty", out["repetition_penalty"], False, 0, low_open=True)
    if out["seed"] is not None:
        _number("seed", out["seed"], True, 0)
    if isinstance(out["stop"], str):
        out["stop"] = [out["stop"]]
    if not isinstance(out["stop"], list) or not all(isinstance(s, str) and s for s in out["stop"]):
        raise ValueError(f"sampling param stop: {out['stop']!r} is not a list of non-empty strings")
    if not isinstance(out["stop_token_ids"], list) or not all(
            isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in out["stop_token_ids"]):
        raise ValueError(f"sampling param stop_token_ids: {out['stop_token_ids']!r} is not a list of token ids")
    for key in ("logprobs", "ignore_eos", "include_stop_str_in_output", "skip_special_tokens"):
        if not isinstance(out[key], bool):
            raise ValueError(f"sampling param {key}: {out[key]!r} is not true/false"
                             + ("; true returns the sampled tokens' logprobs" if key == "logprobs" else ""))
    return out


@dataclasses.dataclass(frozen=True)
class Request:
    """One prompt and its sampling params. Give exactly one of `prompt_token_ids` (what trainers
    hold), `prompt` (text) or `messages` (chat, rendered with the model's chat template). `tag` stays
    on the trainer's side and comes back on the Completion (e.g. the ground truth of the prompt)."""

    prompt_token_ids: list[int] | None = None
    prompt: str | None = None
    messages: list[dict[str, str]] | None = None
    params: dict[str, Any] | None = None
    tag: Any = None

    def wire(self, request_id: str) -> dict[str, Any]:
        """Checked plain data for the engine. ValueError names what is wrong."""
        given = [k for k in ("prompt_token_ids", "prompt", "messages") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"request {request_id}: give exactly one of prompt_token_ids, prompt, messages "
                             f"(got {given or 'none'})")
        ids = self.prompt_token_ids
        if ids is not None and (not ids or not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                                   for t in ids)):
            raise ValueError(f"request {request_id}: prompt_token_ids must be a non-empty list of token ids")
        if self.prompt is not None and not isinstance(self.prompt, str):
            raise ValueError(f"request {request_id}: prompt must be a string")
        if self.messages is not None and not (self.messages and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in self.messages)):
            raise ValueError(f"request {request_id}: messages must be a non-empty list of "
                             f"{{'role': ..., 'content': ...}} dicts")
        params = sampling_params(self.params)
        return {"id": request_id, "prompt_token_ids": list(ids) if ids is not None else None,
                "prompt": self.prompt, "messages": self.messages, "params": params,
                "indices": list(range(params["n"]))}


@dataclasses.dataclass(frozen=True)
class Sample:
    index: int  # 0..n-1 within its request
    token_ids: list[int]
    text: str
    logprobs: list[float] | None  # the sampled tokens' logprobs, when asked (vLLM's raw logprobs)
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    engine: int
    admitted_version: int  # the engine's weight version when the sample started
    completed_version: int  # ... when it finished; differs only under sync.inflight: keep

    @property
    def spans_update(self) -> bool:
        return self.admitted_version != self.completed_version


@dataclasses.dataclass(frozen=True)
class Completion:
    request_id: str
    tag: Any
    prompt_token_ids: list[int]
    samples: tuple[Sample, ...]
    engine: int

    @property
    def admitted_version(self) -> int:
        return min(s.admitted_version for s in self.samples)

    def staleness(self, version: int) -> int:
        """How many versions the oldest sample is behind `version` (the policy being trained)."""
        return version - self.admitted_version


def completion(item: dict[str, Any], tag: Any) -> Completion:
    prompt_tokens = len(item["prompt_token_ids"])
    samples = tuple(Sample(s["index"], s["token_ids"], s["text"], s["logprobs"], s["finish_reason"], prompt_tokens,
                           item["engine"], s["admitted_version"], s["completed_version"])
                    for s in sorted(item["samples"], key=lambda s: s["index"]))
    return Completion(item["id"], tag, item["prompt_token_ids"], samples, item["engine"])


def describe(exc: BaseException) -> str:
    """The root cause of a Ray error, one line."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[-1] if text else ''}"[:500]


class Rollouts:
    """One rollout client. Thread-safe: one thread may submit while another takes results."""

    def __init__(self, fleet, engines: list[int] | None = None):
        self.fleet = fleet
        self.indices = list(range(len(fleet.engines))) if engines is None else list(engines)
        self.engines = [fleet.engines[i] for i in self.indices]
        self.spec = fleet.spec
        self.client = uuid.uuid4().hex[:12]
        self._ids = itertools.count()
        self._lock = threading.Condition()
        self._pump_lock = threading.Lock()
        self._inflight = [0] * len(self.engines)  # samples on each engine, not yet received
        self._buffer: deque[tuple[Completion, Request]] = deque()  # received, not yet handed out
        self._pending: dict[str, tuple[Request, int]] = {}  # request id -> (request, samples)
        self._polls: dict[int, Any] = {}
        self._submitting = 0  # submit() calls under way (another thread's results are still coming)
        self._seen_version = 0
        self.stats = {"submitted": 0, "completed": 0, "stale_resubmitted": 0, "max_staleness": 0}

    # ---- accounting ---------------------------------------------------------------------------

    @property
    def outstanding(self) -> int:
        """Samples submitted and not yet handed to the caller (in flight or buffered)."""
        with self._lock:
            return self._outstanding()

    def _outstanding(self) -> int:
        return sum(self._inflight) + sum(len(c.samples) for c, _ in self._buffer)

    @property
    def version(self) -> int:
        """The newest weight version known here: pushed by this process's sender or seen on a sample."""
        return max(self.fleet.version, self._seen_version)

    # ---- submit -------------------------------------------------------------------------------

    def submit(self, requests: Iterable[Request], timeout_s: float | None = None) -> list[str]:
        """Send requests to the engines (groups balanced by samples in flight). Blocks while
        `rollout.queueSize` samples are outstanding, up to `timeout_s` (default timeouts.healthSeconds)."""
        requests = list(requests)
        wires = [(r, r.wire(f"{self.client}-{next(self._ids)}")) for r in requests]  # all checked first
        limit = self.spec.rollout.queue_size
        for r, w in wires:
            if w["params"]["n"] > limit:
                raise ValueError(f"request {w['id']}: n={w['params']['n']} exceeds rollout.queueSize={limit}; "
                                 f"raise rollout.queueSize")
        timeout_s = self.spec.timeouts.health_seconds if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        by_engine: dict[int, list[dict[str, Any]]] = {}
        with self._lock:
            self._submitting += 1
        try:
            return self._submit(wires, limit, timeout_s, deadline, by_engine)
        finally:
            with self._lock:
                self._submitting -= 1
                self._lock.notify_all()

    def _submit(self, wires, limit: int, timeout_s: float, deadline: float, by_engine) -> list[str]:
        with self._lock:
            for r, w in wires:
                n = w["params"]["n"]
                while self._outstanding() + n > limit:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        self._send(by_engine)  # what was admitted so far still goes out
                        raise RolloutError(
                            f"submit: {self._outstanding()} samples outstanding, rollout.queueSize={limit}, for "
                            f"{timeout_s:g} s; take results (take/results) from another thread or raise "
                            f"rollout.queueSize")
                    if by_engine:  # let the engines start on what fits while we wait
                        self._send(by_engine)
                        by_engine = {}
                    self._lock.wait(min(left, 0.5))
                engine = min(range(len(self.engines)), key=lambda i: (self._inflight[i], i))  # a position
                self._inflight[engine] += n
                self._pending[w["id"]] = (r, n)
                by_engine.setdefault(engine, []).append(w)
                self.stats["submitted"] += 1
            self._send(by_engine)
        return [w["id"] for _, w in wires]

    def _send(self, by_engine: dict[int, list[dict[str, Any]]]) -> None:
        import ray

        refs = {i: self.engines[i].submit.remote(self.client, wires) for i, wires in by_engine.items()}
        for i, ref in refs.items():
            try:
                ray.get(ref, timeout=self.spec.timeouts.health_seconds)
            except Exception as exc:
                raise RolloutError(f"submit: engine {self.indices[i]} failed: {describe(exc)}") from None

    # ---- receive ------------------------------------------------------------------------------

    def _pump(self, deadline: float) -> None:
        """Wait (until `deadline`) for at least one poll to answer and buffer what it brought."""
        import ray

        with self._pump_lock:
            with self._lock:
                for i in range(len(self.engines)):
                    if self._inflight[i] and i not in self._polls:
                        self._polls[i] = self.engines[i].poll.remote(self.client, POLL_SECONDS)
                polls = dict(self._polls)
            if not polls:
                return
            ready, _ = ray.wait(list(polls.values()), num_returns=1, timeout=max(deadline - time.monotonic(), 0))
            for i, ref in polls.items():
                if ref not in ready:
                    continue
                with self._lock:
                    del self._polls[i]
                try:
                    items = ray.get(ref)
                except Exception as exc:
                    with self._lock:
                        held = self._inflight[i]
                    raise RolloutError(f"engine {self.indices[i]} failed with {held} sample(s) of this client in flight: "
                                       f"{describe(exc)}; engines are not restarted, restart the fleet") from None
                self._arrived(i, items)

    def _arrived(self, engine: int, items: list[dict[str, Any]]) -> None:
        errors = []
        with self._lock:
            for item in items:
                request, n = self._pending.pop(item["id"])
                self._inflight[engine] -= n
                if item.get("error"):
                    errors.append(f"request {item['id']} (tag {request.tag!r}) failed on engine {self.indices[engine]}: "
                                  f"{item['error']}")
                    continue
                c = completion(item, request.tag)
                self._seen_version = max(self._seen_version, *(s.completed_version for s in c.samples))
                self._buffer.append((c, request))
                self.stats["completed"] += 1
            self._lock.notify_all()
        if errors:  # the other results stay buffered
            raise RolloutError("; ".join(errors))

    def _wait_one(self, timeout_s: float | None, what: str) -> tuple[Completion, Request] | None:
        """The next buffered completion (and its request), pumping as needed; None when nothing is
        in flight."""
        timeout_s = self.spec.timeouts.health_seconds if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s  # an inactivity timeout: it restarts on every arrival
        while True:
            with self._lock:
                if self._buffer:
                    item = self._buffer.popleft()
                    self._lock.notify_all()  # space for blocked submitters
                    return item
                if not any(self._inflight):
                    if not self._submitting:
                        return None
                    self._lock.wait(0.05)  # a submit in another thread is about to send more
                    continue
            if time.monotonic() > deadline:
                with self._lock:
                    load = {f"engine {self.indices[i]}": n for i, n in enumerate(self._inflight) if n}
                raise RolloutError(f"{what}: no result for {timeout_s:g} s (timeouts.healthSeconds) with samples in "
                                   f"flight {load}; check fleet.health() and the engines' logs, or raise the timeout")
            before = self.stats["completed"]
            self._pump(deadline)
            if self.stats["completed"] > before:
                deadline = time.monotonic() + timeout_s

    def results(self, timeout_s: float | None = None) -> Iterator[Completion]:
        """Completions as they finish (any order), until nothing is in flight. `timeout_s` (default
        timeouts.healthSeconds) bounds the wait for each next one."""
        while (item := self._wait_one(timeout_s, "results")) is not None:
            yield item[0]

    def take(self, count: int, version: int | None = None, timeout_s: float | None = None) -> list[Completion]:
        """`count` completions for a step that trains policy `version` (default: `self.version`).
        A group admitted more than rollout.maxStaleness versions before it is resubmitted instead."""
        limit = self.spec.rollout.max_staleness
        out: list[Completion] = []
        while len(out) < count:
            item = self._wait_one(timeout_s, f"take({count})")
            if item is None:
                raise RolloutError(f"take({count}): only {len(out)} result(s) and nothing more in flight; "
                                   f"submit {count - len(out)} more request(s) first")
            c, request = item
            staleness = c.staleness(self.version if version is None else version)
            if staleness > limit:  # too old for this step: generate it again on the current weights
                self.stats["stale_resubmitted"] += 1
                self.submit([request], timeout_s)
                continue
            self.stats["max_staleness"] = max(self.stats["max_staleness"], staleness)
            out.append(c)
        return out

    def generate(self, requests: list[Request], timeout_s: float | None = None) -> list[Completion]:
        """Submit and wait for all, in the order given (chunked by rollout.queueSize)."""
        out: dict[str, Completion] = {}
        ids: list[str] = []
        chunk: list[Request] = []
        limit = self.spec.rollout.queue_size

        def flush():
            ids.extend(self.submit(chunk, timeout_s))
            for c in self.results(timeout_s):
                out[c.request_id] = c
            chunk.clear()

        used = 0
        for r in requests:
            n = sampling_params(r.params)["n"]
            if chunk and used + n > limit:
                flush()
                used = 0
            chunk.append(r)
            used += n
        if chunk:
            flush()
        return [out[i] for i in ids]

    def close(self) -> None:
        """Cancel this client's requests on every engine and drop its queues."""
        import ray

        refs = [e.cancel.remote(self.client) for e in self.engines]
        ray.wait(refs, num_returns=len(refs), timeout=self.spec.timeouts.health_seconds)
        with self._lock:
            self._inflight = [0] * len(self.engines)
            self._buffer.clear()
            self._pending.clear()
            self._polls.clear()
            self._lock.notify_all()

    def __enter__(self) -> Rollouts:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
