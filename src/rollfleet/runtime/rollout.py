"""Asynchronous rollout collection, the trainer's side: submit requests, take results as they finish.

```python
rollouts = fleet.rollouts()                       # one client: its own queue on every engine
rollouts.submit([Request(prompt_token_ids=ids, params={"n": 8, "temperature": 1.0}, tag=row)])
for completion in rollouts.results(): ...        # in completion order, each group complete
batch = rollouts.take(64, version=policy_version)  # 64 groups, none staler than rollout.maxStaleness
completions = fleet.generate(prompts, params)     # blocking, in prompt order (a private client)
```

* A request is one prompt (token ids, text, or chat messages rendered with the model's chat template)
  and its sampling parameters, all checked here (one line naming the parameter and its bound); its
  `n` samples stay on one engine, so the prefix is cached once. Requests go to the serving engine
  with the fewest samples in flight from this client.
* Each sample says which weight version produced which of its tokens (`Sample.versions`); under
  `sync.inflight: abort` a group may mix versions across its samples, a sample never; under `keep`
  a sample may span a push, and says where.
* Backpressure: at most `rollout.queueSize` samples may be outstanding (submitted, not yet taken);
  `submit` blocks beyond that, so a slow trainer slows submission instead of growing memory.
* Staleness: `take(count, version)` never returns a group admitted more than `rollout.maxStaleness`
  versions before `version` (the policy version the batch trains); such a group is resubmitted on
  the current weights and counted in `stats["stale_resubmitted"]`.
* Exactly once: every submitted request ends in one Completion or one error naming it. A request on an
  engine that died, froze or restarted is sent again to a serving engine (at most
  recovery.requestAttempts times in all); a late answer of the old attempt is dropped. An error never
  drops what was collected: ready completions stay for the next call.
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time
import uuid
from collections import deque
from typing import Any, Callable, Iterable, Iterator

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from rollfleet.runtime import metrics
from rollfleet.runtime.calls import actor_died, describe
from rollfleet.runtime.supervisor import SERVING

POLL_SECONDS = 1.0  # an engine answers a poll at once when results are ready, else after this
ROSTER_SECONDS = 0.5  # how old the client's view of the engines' states may get while it waits
SEED_LIMIT = 2**63  # vLLM seeds a torch.Generator per request: seed + sample index must stay an int64


class RolloutError(RuntimeError):
    """A rollout failed: the message names the engine or request and what to change."""


class RequestsFailed(RolloutError):
    """Requests failed (each named once); everything else this client holds goes on."""


class SamplingParams(BaseModel):
    """vLLM's SamplingParams that rollfleet passes on, with vLLM's defaults (0.14.1 and 0.20.2 agree;
    the CPU stand-in honours the same). Strict: no strings for numbers, no NaN or infinity."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    n: int = Field(1, ge=1)
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=-1)
    min_p: float = Field(0.0, ge=0, le=1)
    max_tokens: int = Field(16, ge=1)
    min_tokens: int = Field(0, ge=0)
    stop: list[str] = []
    stop_token_ids: list[int] = []
    seed: int | None = Field(None, ge=0)
    logprobs: bool = False
    """true: the sampled tokens' logprobs, on the weights that produced them (behaviour logprobs)."""
    repetition_penalty: float = Field(1.0, gt=0)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True

    @model_validator(mode="before")
    @classmethod
    def _one_stop_string(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("stop"), str):
            return {**data, "stop": [data["stop"]]}
        return data

    @model_validator(mode="after")
    def _bounds(self) -> SamplingParams:
        if self.min_tokens > self.max_tokens:
            raise ValueError(f"min_tokens: {self.min_tokens} must be <= max_tokens ({self.max_tokens})")
        if self.seed is not None and self.seed + self.n - 1 >= SEED_LIMIT:
            raise ValueError(f"seed: {self.seed} must be < 2**63 - n + 1 (each sample is seeded seed + its index)")
        if not all(self.stop):
            raise ValueError("stop: an empty string never stops; remove it")
        if any(t < 0 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids: {self.stop_token_ids} holds a negative token id")
        return self


SAMPLING_DEFAULTS: dict[str, Any] = SamplingParams().model_dump()


_BOUNDS = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
_KINDS = {"int": "an integer", "float": "a number", "bool": "true/false", "string": "a string", "list": "a list"}


def _problem(err: dict[str, Any], params: dict[str, Any]) -> str:
    """One pydantic error as `sampling param KEY: VALUE must be ...` (the bound, or the kind wanted)."""
    loc = [str(p) for p in err["loc"]]
    if not loc:  # a rule of the model (_bounds): its message starts with the key
        return f"sampling param {err['msg'].removeprefix('Value error, ')}"
    value = params.get(loc[0]) if len(loc) == 1 else err.get("input")
    kind = err["type"]
    if kind in _BOUNDS:
        bound = next(iter(err["ctx"].values()))
        what = f"must be {_BOUNDS[kind]} {bound:g}"
    elif kind == "finite_number":
        what = "must be a finite number"
    elif kind.split("_")[0] in _KINDS:
        what = f"is not {_KINDS[kind.split('_')[0]]}"
    else:
        what = err["msg"].lower()
    return f"sampling param {'.'.join(loc)}: {value!r} {what}"


def sampling_params(params: dict[str, Any] | None) -> dict[str, Any]:
    """`params` checked and completed with vLLM's defaults. ValueError names the key and the bound."""
    params = dict(params or {})
    unknown = sorted(set(params) - set(SAMPLING_DEFAULTS))
    if unknown:
        raise ValueError(f"sampling params {unknown} not supported; supported: {', '.join(SAMPLING_DEFAULTS)}")
    try:
        return SamplingParams.model_validate(params).model_dump()
    except ValidationError as exc:
        raise ValueError(_problem(exc.errors()[0], params)) from None


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

    def wire(self, request_id: str, vocab_size: int | None = None) -> dict[str, Any]:
        """Checked plain data for the engine. ValueError names what is wrong and the bound."""
        given = [k for k in ("prompt_token_ids", "prompt", "messages") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(f"request {request_id}: give exactly one of prompt_token_ids, prompt, messages "
                             f"(got {given or 'none'})")
        ids = self.prompt_token_ids
        if ids is not None and (not isinstance(ids, list) or not ids or not all(
                isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in ids)):
            raise ValueError(f"request {request_id}: prompt_token_ids must be a non-empty list of token ids")
        if self.prompt is not None and not (isinstance(self.prompt, str) and self.prompt):
            raise ValueError(f"request {request_id}: prompt must be a non-empty string")
        if self.messages is not None and not (isinstance(self.messages, list) and self.messages and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in self.messages)):
            raise ValueError(f"request {request_id}: messages must be a non-empty list of "
                             f"{{'role': ..., 'content': ...}} dicts")
        try:
            params = sampling_params(self.params)
        except ValueError as exc:
            raise ValueError(f"request {request_id}: {exc}") from None
        if vocab_size is not None:
            for what, tokens in (("prompt_token_ids", ids or []), ("sampling param stop_token_ids",
                                                                   params["stop_token_ids"])):
                beyond = [t for t in tokens if t >= vocab_size]
                if beyond:
                    raise ValueError(f"request {request_id}: {what}: {beyond[:3]} beyond the model's vocabulary "
                                     f"(ids < {vocab_size})")
        return {"id": request_id, "prompt_token_ids": list(ids) if ids is not None else None,
                "prompt": self.prompt, "messages": self.messages, "params": params,
                "indices": list(range(params["n"]))}


def as_request(prompt: Any, params: dict[str, Any] | None) -> Request:
    """A Request from text, token ids or chat messages with `params` (a Request stays as it is)."""
    if isinstance(prompt, Request):
        return prompt
    if isinstance(prompt, str):
        return Request(prompt=prompt, params=params)
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        return Request(messages=prompt, params=params)
    return Request(prompt_token_ids=list(prompt), params=params)


@dataclasses.dataclass(frozen=True)
class Sample:
    index: int  # 0..n-1 within its request
    token_ids: list[int]
    text: str
    logprobs: list[float] | None  # the sampled tokens' logprobs on the weights that produced them, when asked
    finish_reason: str  # "stop" or "length"
    prompt_tokens: int
    engine: int
    versions: tuple[tuple[int, int], ...]  # (first token, weight version) of each stretch, in order

    @property
    def admitted_version(self) -> int:
        """The version of the sample's first token."""
        return self.versions[0][1]

    @property
    def completed_version(self) -> int:
        """The version of its last token; differs from admitted_version only under sync.inflight: keep."""
        return self.versions[-1][1]

    @property
    def spans_update(self) -> bool:
        return len(self.versions) > 1

    def token_versions(self) -> list[int]:
        """The weight version that produced each token."""
        out: list[int] = []
        for k, (start, version) in enumerate(self.versions):
            end = self.versions[k + 1][0] if k + 1 < len(self.versions) else len(self.token_ids)
            out += [version] * (end - start)
        return out


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
                           item["engine"], tuple(tuple(v) for v in s["versions"]))
                    for s in sorted(item["samples"], key=lambda s: s["index"]))
    return Completion(item["id"], tag, item["prompt_token_ids"], samples, item["engine"])


@dataclasses.dataclass
class _Pending:
    request: Request
    wire: dict[str, Any]
    n: int
    engine: int | None = None  # where it is now (None: waiting for an engine that serves)
    incarnation: str | None = None  # of that engine when it was sent there
    attempts: int = 0


class Rollouts:
    """One rollout client. Thread-safe: one thread may submit while another takes results.

    `engines`: the engines it prefers (default all); `fallback`: when none of them serves, any engine
    that does (the colocated layout's rank uses its own engine, another while its own is replaced);
    `on_stall()`: called when requests wait and the only engines they may go to are stale (replaced,
    not yet synced): a lone trainer pushes its current weights there (TrainerContext)."""

    def __init__(self, fleet, engines: list[int] | None = None, fallback: bool = False,
                 on_stall: Callable[[], None] | None = None):
        self.fleet, self.spec = fleet, fleet.spec
        self.preferred = list(range(len(fleet.engines))) if engines is None else list(engines)
        self.fallback, self.on_stall = fallback, on_stall
        self.client = uuid.uuid4().hex[:12]
        self._ids = itertools.count()
        self._lock = threading.Condition()
        self._pump_lock = threading.Lock()
        self._inflight: dict[int, int] = {}  # samples on each engine, not yet received
        self._buffer: deque[tuple[Completion, Request]] = deque()  # received, not yet handed out
        self._pending: dict[str, _Pending] = {}  # request id -> where it is
        self._errors: list[str] = []  # one per failed request, raised by the next receiving call
        self._held: list[Completion] = []  # what a take() that raised had collected: the next one starts with it
        self._polls: dict[int, Any] = {}
        self._submitting = 0  # submit() calls under way (another thread's results are still coming)
        self._seen_version = 0
        self._roster: dict[str, Any] = fleet.roster()
        self._roster_at = time.monotonic()
        self._stalled_epoch: int | None = None
        self.stats = {"submitted": 0, "completed": 0, "failed": 0, "resent": 0, "stale_resubmitted": 0,
                      "max_staleness": 0}
        metrics.zero("rollfleet_requests_resent", fleet=self.spec.name)

    # ---- accounting ---------------------------------------------------------------------------

    @property
    def outstanding(self) -> int:
        """Samples submitted and not yet handed to the caller (in flight, waiting or buffered)."""
        with self._lock:
            return self._outstanding()

    def _outstanding(self) -> int:
        return sum(p.n for p in self._pending.values()) + sum(len(c.samples) for c, _ in self._buffer)

    @property
    def version(self) -> int:
        """The newest weight version known here: pushed to the fleet or seen on a sample."""
        return max(self._roster["version"], self._seen_version)

    # ---- the engines' states --------------------------------------------------------------------

    def _refresh(self, force: bool = False) -> None:
        """Re-read the fleet's roster (at most every ROSTER_SECONDS unless forced); requests on an
        engine that is no longer the incarnation they went to are sent again."""
        if not force and time.monotonic() - self._roster_at < ROSTER_SECONDS:
            return
        roster = self.fleet.roster()
        with self._lock:
            self._roster, self._roster_at = roster, time.monotonic()
            if roster["failed"]:
                raise RolloutError(f"the fleet failed: {roster['failed']}")
            states = roster["engines"]
            lost = [rid for rid, p in self._pending.items() if p.engine is not None and p.incarnation is not None
                    and states[p.engine]["incarnation"] is not None  # None: an unsupervised fleet
                    and (states[p.engine]["incarnation"] != p.incarnation
                         or states[p.engine]["state"] in ("dead", "restarting", "failed"))]
            for rid in lost:
                p = self._pending[rid]
                self._move(rid, f"engine {p.engine} {states[p.engine]['state']}: {states[p.engine]['reason']}")

    def _serving(self) -> list[int]:
        states = self._roster["engines"]
        ok = [i for i in self.preferred if states[i]["state"] in SERVING]
        if not ok and self.fallback:
            ok = [s["index"] for s in states if s["state"] in SERVING]
        return ok

    def _move(self, rid: str, why: str) -> None:
        """Take request `rid` off its engine (lost there) and queue it for another (lock held)."""
        p = self._pending[rid]
        if p.engine is not None:
            self._inflight[p.engine] -= p.n
        p.engine = p.incarnation = None
        if p.attempts >= self.spec.recovery.request_attempts:
            del self._pending[rid]
            self._errors.append(f"request {rid} (tag {p.request.tag!r}) was sent {p.attempts} times "
                                f"(recovery.requestAttempts={self.spec.recovery.request_attempts}) and lost each "
                                f"time, last: {why}")
            self.stats["failed"] += 1
        else:
            self.stats["resent"] += 1
            metrics.inc("rollfleet_requests_resent", fleet=self.spec.name)
        self._lock.notify_all()

    def _route(self) -> None:
        """Send every request that has no engine to a serving one (the least loaded)."""
        with self._lock:
            waiting = [rid for rid, p in self._pending.items() if p.engine is None]
            if not waiting:
                return
            serving = self._serving()
            if not serving:
                return
            by_engine: dict[int, list[str]] = {}
            for rid in waiting:
                p = self._pending[rid]
                engine = min(serving, key=lambda i: (self._inflight.get(i, 0), i))
                p.engine, p.attempts = engine, p.attempts + 1
                self._inflight[engine] = self._inflight.get(engine, 0) + p.n
                by_engine.setdefault(engine, []).append(rid)
            wires = {i: [self._pending[r].wire for r in rids] for i, rids in by_engine.items()}
        self._send(by_engine, wires)

    def _send(self, by_engine: dict[int, list[str]], wires: dict[int, list[dict[str, Any]]]) -> None:
        import ray

        sent_to = {i: self._roster["engines"][i]["incarnation"] for i in wires}
        refs = {i: self.fleet.engines[i].submit.remote(self.client, w) for i, w in wires.items()}
        for i, ref in refs.items():
            try:
                incarnation = ray.get(ref, timeout=self.fleet.timeouts.health.seconds)
                why = None
            except Exception as exc:
                incarnation, why = None, f"engine {i} refused them: {describe(exc)}"
                if actor_died(exc):
                    self.fleet.report(i, sent_to[i], why)
            with self._lock:
                for rid in by_engine[i]:
                    p = self._pending.get(rid)
                    if p is None or p.engine != i:
                        continue
                    if why:
                        self._move(rid, why)
                    else:
                        p.incarnation = incarnation

    # ---- submit -------------------------------------------------------------------------------

    def submit(self, requests: Iterable[Request], timeout_s: float | None = None) -> list[str]:
        """Send requests to the engines (groups balanced by samples in flight). Blocks while
        `rollout.queueSize` samples are outstanding, up to `timeout_s` (default timeouts.healthSeconds)."""
        requests = list(requests)
        self._refresh(force=True)  # a fleet that failed takes no more requests
        vocab = getattr(self.fleet, "vocab_size", None)
        wires = [(r, r.wire(f"{self.client}-{next(self._ids)}", vocab)) for r in requests]  # all checked first
        limit = self.spec.rollout.queue_size
        for r, w in wires:
            if w["params"]["n"] > limit:
                raise ValueError(f"request {w['id']}: n={w['params']['n']} exceeds rollout.queueSize={limit}; "
                                 f"raise rollout.queueSize")
        timeout_s = self.fleet.timeouts.health.seconds if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s
        with self._lock:
            self._submitting += 1
        try:
            for r, w in wires:
                n = w["params"]["n"]
                while True:
                    with self._lock:
                        if self._outstanding() + n <= limit:
                            self._pending[w["id"]] = _Pending(r, w, n)
                            self.stats["submitted"] += 1
                            break
                        left = deadline - time.monotonic()
                        if left <= 0:
                            raise RolloutError(
                                f"submit: {self._outstanding()} samples outstanding, rollout.queueSize={limit}, for "
                                f"{timeout_s:g} s; take results (take/results) from another thread or raise "
                                f"rollout.queueSize")
                        unsent = any(p.engine is None for p in self._pending.values())
                        if not unsent:
                            self._lock.wait(min(left, 0.5))
                            continue
                    self._refresh()  # let the engines start on what fits while we wait for room
                    self._route()
                    with self._lock:
                        self._lock.wait(min(left, 0.05))
            self._refresh()
            self._route()
        finally:
            with self._lock:
                self._submitting -= 1
                self._lock.notify_all()
        return [w["id"] for _, w in wires]

    # ---- receive ------------------------------------------------------------------------------

    def _pump(self, deadline: float) -> None:
        """Wait (until `deadline`, at most ROSTER_SECONDS) for a poll to answer and take in what it brought."""
        import ray

        with self._pump_lock:
            self._refresh()
            self._route()
            self._stalled()
            with self._lock:
                busy = {p.engine: p.incarnation for p in self._pending.values() if p.engine is not None}
                for i, incarnation in busy.items():
                    if i not in self._polls:  # (the poll, the incarnation it was sent to)
                        self._polls[i] = (self.fleet.engines[i].poll.remote(self.client, POLL_SECONDS), incarnation)
                polls = dict(self._polls)
            if not polls:
                time.sleep(min(max(deadline - time.monotonic(), 0), ROSTER_SECONDS))
                return
            wait = min(max(deadline - time.monotonic(), 0), ROSTER_SECONDS)
            refs = [ref for ref, _ in polls.values()]
            ready, _ = ray.wait(refs, num_returns=1, timeout=wait)
            if not ready:
                return
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)  # and whatever else is in
            for i, (ref, incarnation) in polls.items():
                if ref not in ready:
                    continue
                with self._lock:
                    del self._polls[i]
                try:
                    answer = ray.get(ref)
                except Exception as exc:
                    self._engine_lost(i, incarnation, exc)
                    continue
                self._arrived(i, answer)

    def _engine_lost(self, engine: int, incarnation: str | None, exc: BaseException) -> None:
        """A poll to `incarnation` of engine `engine` failed: this client's requests there are sent
        elsewhere (those already sent to a newer incarnation stay)."""
        why = f"engine {engine} failed: {describe(exc)}"
        if actor_died(exc):
            self.fleet.report(engine, incarnation, why)
        with self._lock:
            for rid in [rid for rid, p in self._pending.items() if p.engine == engine
                        and (p.incarnation in (incarnation, None) or incarnation is None)]:
                self._move(rid, why)

    def _stalled(self) -> None:
        """Requests wait, and no engine they may go to serves: tell on_stall once per roster change
        when one of those engines is stale (it needs a push before it serves)."""
        with self._lock:
            waiting = any(p.engine is None for p in self._pending.values())
            states = self._roster["engines"]
            candidates = self.preferred if not self.fallback else range(len(states))
            stale = any(states[i]["state"] == "stale" for i in candidates)
            epoch = self._roster["epoch"]
        if waiting and not self._serving() and stale and self.on_stall and self._stalled_epoch != epoch:
            self._stalled_epoch = epoch
            self.on_stall()
            self._refresh(force=True)

    def _arrived(self, engine: int, answer: dict[str, Any]) -> None:
        with self._lock:
            for item in answer["items"]:
                p = self._pending.get(item["id"])
                if p is None or p.engine != engine:
                    continue  # an attempt this client gave up on (the request went elsewhere)
                if item.get("retry"):
                    self._move(item["id"], item["retry"])
                    continue
                del self._pending[item["id"]]
                self._inflight[engine] -= p.n
                if item.get("error"):
                    self._errors.append(f"request {item['id']} (tag {p.request.tag!r}) failed on engine {engine}: "
                                        f"{item['error']}")
                    self.stats["failed"] += 1
                    continue
                c = completion(item, p.request.tag)
                self._seen_version = max(self._seen_version, *(s.completed_version for s in c.samples))
                self._buffer.append((c, p.request))
                self.stats["completed"] += 1
            self._lock.notify_all()

    def _raise_errors(self) -> None:
        with self._lock:
            errors, self._errors = self._errors, []
        if errors:
            raise RequestsFailed("; ".join(errors))

    def _wait_one(self, timeout_s: float | None, what: str) -> tuple[Completion, Request] | None:
        """The next buffered completion (and its request), pumping as needed; None when nothing is
        outstanding. A failed request is raised (once) before more is handed out."""
        timeout_s = self.fleet.timeouts.health.seconds if timeout_s is None else timeout_s
        deadline = time.monotonic() + timeout_s  # an inactivity timeout: it restarts on every arrival
        while True:
            self._raise_errors()
            with self._lock:
                if self._buffer:
                    item = self._buffer.popleft()
                    self._lock.notify_all()  # space for blocked submitters
                    return item
                if not self._pending:
                    if not self._submitting:
                        return None
                    self._lock.wait(0.05)  # a submit in another thread is about to send more
                    continue
            if time.monotonic() > deadline:
                with self._lock:
                    load = {f"engine {i}": n for i, n in self._inflight.items() if n}
                    waiting = sum(p.engine is None for p in self._pending.values())
                states = {s["index"]: s["state"] for s in self._roster["engines"]}
                raise RolloutError(f"{what}: no result for {timeout_s:g} s (timeouts.healthSeconds) with samples in "
                                   f"flight {load}" + (f", {waiting} request(s) waiting for a serving engine "
                                                       f"(engines: {states})" if waiting else "")
                                   + "; check fleet.health() and the engines' logs, or raise the timeout")
            before = self.stats["completed"] + self.stats["failed"]
            self._pump(deadline)
            if self.stats["completed"] + self.stats["failed"] > before:
                deadline = time.monotonic() + timeout_s

    def results(self, timeout_s: float | None = None) -> Iterator[Completion]:
        """Completions as they finish (any order), until nothing is outstanding. `timeout_s` (default
        timeouts.healthSeconds) bounds the wait for each next one. A failed request raises; the
        completions not yet handed out stay for the next call."""
        while (item := self._wait_one(timeout_s, "results")) is not None:
            yield item[0]

    def take(self, count: int, version: int | None = None, timeout_s: float | None = None) -> list[Completion]:
        """`count` completions for a step that trains policy `version` (default: `self.version`).
        A group admitted more than rollout.maxStaleness versions before it is resubmitted instead.
        If a request failed, the error is raised and what this call had collected is kept: the next
        take() starts with it."""
        limit = self.spec.rollout.max_staleness
        out, self._held = self._held, []
        try:
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
                metrics.observe("rollfleet_sample_staleness", staleness, fleet=self.spec.name)
                out.append(c)
        except BaseException:
            self._held = out
            raise
        return out

    def generate(self, requests: list[Request], timeout_s: float | None = None) -> list[Completion]:
        """Submit and wait for all, in the order given (chunked by rollout.queueSize). Failed requests
        raise one RolloutError after every other request finished; its `completions` holds the ones
        that did (None for a failed one), in order."""
        out: dict[str, Completion] = {}
        ids: list[str] = []
        errors: list[str] = []
        chunk: list[Request] = []
        limit = self.spec.rollout.queue_size

        def flush():
            ids.extend(self.submit(chunk, timeout_s))
            while True:
                try:
                    for c in self.results(timeout_s):
                        out[c.request_id] = c
                    break
                except RequestsFailed as exc:  # the others go on
                    errors.append(str(exc))
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
        if errors:
            err = RequestsFailed("; ".join(errors))
            err.completions = [out.get(i) for i in ids]
            raise err
        return [out[i] for i in ids]

    def close(self) -> None:
        """Cancel this client's requests on every engine and drop its queues."""
        import ray

        refs = [e.cancel.remote(self.client) for e in self.fleet.engines]
        ray.wait(refs, num_returns=len(refs), timeout=self.fleet.timeouts.health.seconds)
        with self._lock:
            self._inflight.clear()
            self._buffer.clear()
            self._pending.clear()
            self._polls.clear()
            self._lock.notify_all()

    def __enter__(self) -> Rollouts:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
