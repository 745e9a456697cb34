"""Engine supervision: one threaded Ray actor per fleet that knows each engine's state, probes it,
replaces it when it dies or freezes, and is the roster every client and sender reads.

States (NeMo-RL's fleet health, with slime's kill-and-recreate):
  healthy  ⇄ suspect (a probe went unanswered)  → dead (a second one, or the actor died, or a real call
  failed with the actor gone, or its engine core died) → restarting (Ray restarts the actor in its
  placement bundle, on the same GPUs; the supervisor starts it) → stale (loaded, weights of no pushed
  version) → healthy only when a push reaches it (`synced`). Before the first push (version 0) a
  started engine holds the pushed weights already: it is healthy at once.
  failed: its restart budget (recovery.maxRestarts within recovery.windowSeconds) is spent; fewer live
  engines than recovery.minEngines fails the whole fleet, with one line naming the engine and why.
Signals: a timed probe through each engine's core every recovery.probeSeconds, one call held open on
each engine (it fails at once when the process dies), and the failures clients and senders report.
Every transition is an event (time, engine, what), which the demo prints.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from typing import Any

from rollfleet.runtime import metrics
from rollfleet.runtime.calls import EngineStartError, actor_died, describe
from rollfleet.runtime.timeouts import Timeouts
from rollfleet.spec import FleetSpec, load_spec

SERVING = ("healthy", "suspect")  # may take requests
MEMBERS = ("healthy", "suspect", "stale")  # started: may join the sync group and receive a push
WATCH_SECONDS = 30.0  # one call held open per engine; it returns (and is sent again) after this


class FleetFailed(RuntimeError):
    """The fleet cannot go on: an engine's restart budget is spent and too few engines are left."""


@dataclasses.dataclass
class Slot:
    index: int
    state: str = "restarting"  # until its first start completes
    incarnation: str | None = None
    version: int = 0
    misses: int = 0  # probes in a row that went unanswered
    before_suspect: str = "healthy"  # the state a suspect returns to when it answers again
    failures: deque = dataclasses.field(default_factory=deque)  # times it was declared dead (the budget)
    reason: str | None = None  # why it was last declared dead
    probe: Any = None  # the probe in flight
    probe_sent: float = 0.0
    watch: Any = None  # the call held open
    start: Any = None  # the start in flight
    start_sent: float = 0.0
    ping: Any = None  # restarting: asks which incarnation answers
    previous: str | None = None  # restarting: the incarnation being replaced (the new one must differ)
    dead_at: float = 0.0


class Supervisor:
    """Create with `ray.remote(Supervisor).options(max_concurrency=16, num_cpus=0)`."""

    def __init__(self, spec_json: dict[str, Any], engines: list[Any], version: int = 0):
        self.spec: FleetSpec = load_spec(spec_json)
        self.timeouts = Timeouts.of(self.spec)
        self.engines = engines
        self.slots = [Slot(i) for i in range(len(engines))]
        self.version = version  # the newest version a push completed on
        self.failed: str | None = None
        self.epoch = 0  # bumps on every change of a state: readers compare it
        self.events: list[dict[str, Any]] = []
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.stopped = threading.Event()
        self.infos: dict[int, dict[str, Any]] = {}
        self._thread: threading.Thread | None = None
        for slot in self.slots:
            metrics.zero("rollfleet_engine_restarts", fleet=self.spec.name, engine=slot.index)

    # ---- states ---------------------------------------------------------------------------------

    def _set(self, slot: Slot, state: str, what: str, **extra: Any) -> None:
        with self.lock:
            slot.state = state
            self.epoch += 1
            self.events.append({"t": time.time(), "engine": slot.index, "state": state, "what": what, **extra})
            self.changed.notify_all()
        metrics.engine_state(self.spec.name, slot.index, state)
        if state == "restarting" and slot.failures:
            metrics.inc("rollfleet_engine_restarts", fleet=self.spec.name, engine=slot.index)
        print(f"[rollfleet] engine {slot.index}: {state}: {what}", flush=True)

    def _dead(self, slot: Slot, reason: str, alive: bool = True) -> None:
        """Declared dead: kill its process if it may still run (`alive`: frozen, or its engine core
        died), then restart it if its budget allows."""
        import ray

        if slot.state in ("dead", "failed") or slot.start is not None:
            return
        now = time.monotonic()
        slot.reason, slot.dead_at = reason, now
        slot.probe = slot.watch = None
        window = self.spec.recovery.window_seconds
        while slot.failures and now - slot.failures[0] > window:
            slot.failures.popleft()
        slot.failures.append(now)
        self._set(slot, "dead", reason)
        budget = self.spec.recovery.max_restarts
        if len(slot.failures) > budget:
            ray.kill(self.engines[slot.index], no_restart=True)
            self._set(slot, "failed", f"failed {len(slot.failures)} times within {window} s "
                                      f"(recovery.windowSeconds) and recovery.maxRestarts={budget} is spent")
            live = sum(s.state != "failed" for s in self.slots)
            if live < self.spec.recovery.min_engines:
                with self.lock:
                    self.failed = (f"engine {slot.index} failed {len(slot.failures)} times within {window} s, last: "
                                   f"{reason}; recovery.maxRestarts={budget} is spent and {live} engine(s) are left "
                                   f"(recovery.minEngines={self.spec.recovery.min_engines})")
                    self.changed.notify_all()
            return
        if alive:
            ray.kill(self.engines[slot.index], no_restart=False)  # a frozen one too; Ray starts a new process
        self._start(slot)

    def _start(self, slot: Slot) -> None:
        """Start the engine's next incarnation: first ask which one answers (a call sent right after a
        kill may still reach the old process), then start that one."""
        slot.previous, slot.incarnation = slot.incarnation, None
        slot.start, slot.ping, slot.start_sent = None, None, time.monotonic()
        self._set(slot, "restarting", "starting a new incarnation in its placement bundle"
                  if slot.failures else "starting")

    def _started(self, slot: Slot, info: dict[str, Any]) -> None:
        slot.start, slot.misses = None, 0
        self.infos[slot.index] = info
        seconds = round(time.monotonic() - slot.start_sent, 3)
        slot.version = 0  # it loaded the model's own weights
        extra = {"start_seconds": seconds, "incarnation": info["incarnation"],
                 "killed_leftovers": info.get("killed_leftovers", [])}
        if self.version == 0:  # which every engine serves before the first push
            self._set(slot, "healthy", f"started in {seconds} s", **extra)
        else:
            self._set(slot, "stale", f"started in {seconds} s; serves once a push reaches it (now v{self.version})",
                      **extra)

    # ---- the watch loop -------------------------------------------------------------------------

    def start_all(self) -> list[dict[str, Any]]:
        """Start every engine (a start that dies is retried within the budget; one that fails for its
        own reason, a missing model or too little memory, is that error) and begin supervising."""
        for slot in self.slots:
            self._start(slot)
        deadline = self.timeouts.init.deadline()
        while True:
            self._tick(probing=False)
            with self.lock:
                if self.failed:
                    raise FleetFailed(self.failed)
                if all(s.state in SERVING or s.state == "failed" for s in self.slots):
                    break
            if time.monotonic() > deadline:
                late = [f"engine {s.index}" for s in self.slots if s.state not in SERVING]
                raise self.timeouts.init.error(f"engine start: {', '.join(late)}")
            time.sleep(0.05)
        self._thread = threading.Thread(target=self._watch, daemon=True, name="rollfleet-supervisor")
        self._thread.start()
        return [self.infos.get(s.index) for s in self.slots]

    def _watch(self) -> None:
        next_probe = time.monotonic() + self.spec.recovery.probe_seconds
        while not self.stopped.wait(0.1):
            try:
                probing = time.monotonic() >= next_probe
                self._tick(probing)
                if probing:
                    next_probe = time.monotonic() + self.spec.recovery.probe_seconds
            except Exception as exc:  # the supervisor must outlive any one engine's trouble
                print(f"[rollfleet] supervisor: {describe(exc)}", flush=True)

    def _tick(self, probing: bool) -> None:
        for slot in self.slots:
            with self.lock:
                self._tick_slot(slot, probing)

    def _tick_slot(self, slot: Slot, probing: bool) -> None:
        import ray

        engine = self.engines[slot.index]
        if slot.state == "restarting" and slot.start is None:
            if time.monotonic() - slot.start_sent > self.timeouts.init.outer:
                self._dead(slot, f"no new incarnation answered within {self.timeouts.init.within}", alive=False)
                return
            slot.ping = slot.ping or engine.health.remote()
            done, _ = ray.wait([slot.ping], timeout=0)
            if done:
                slot.ping = None
                try:
                    answer = ray.get(done[0])["incarnation"]
                except Exception:  # the old process, dying: ask again
                    return
                if answer != slot.previous:
                    slot.incarnation, slot.start = answer, engine.start.remote()
                elif time.monotonic() - slot.start_sent > self.timeouts.probe.seconds:
                    ray.kill(engine, no_restart=False)  # the old process still answers: replace it
                    slot.start_sent = time.monotonic()
            return
        if slot.state == "restarting":
            done, _ = ray.wait([slot.start], timeout=0)
            if done:
                try:
                    self._started(slot, ray.get(slot.start))
                except Exception as exc:
                    slot.start = None
                    if isinstance(getattr(exc, "cause", exc), EngineStartError) and not slot.failures:
                        with self.lock:  # its own fault (model, memory): a restart would fail alike
                            self.failed = describe(exc).removeprefix("EngineStartError: ")
                            self.changed.notify_all()
                        self._set(slot, "failed", self.failed)
                    else:
                        self._dead(slot, f"its start failed: {describe(exc)}", alive=not actor_died(exc))
            elif time.monotonic() - slot.start_sent > self.timeouts.init.outer:
                slot.start = None
                self._dead(slot, f"its start did not finish within {self.timeouts.init.within}")
            return
        if slot.state not in MEMBERS:
            return
        if slot.watch is None:
            slot.watch = engine.watch.remote(WATCH_SECONDS)
        done, _ = ray.wait([slot.watch], timeout=0)
        if done:
            slot.watch = None
            try:
                ray.get(done[0])
            except Exception as exc:
                self._dead(slot, f"its process died ({describe(exc)})", alive=False)
                return
        if slot.probe is None and (probing or slot.state == "suspect"):  # a suspect is probed again at once
            slot.probe, slot.probe_sent = engine.probe.remote(), time.monotonic()
        if slot.probe is not None:
            self._probed(slot)

    def _probed(self, slot: Slot) -> None:
        import ray

        done, _ = ray.wait([slot.probe], timeout=0)
        if not done:
            if time.monotonic() - slot.probe_sent <= self.timeouts.probe.seconds:
                return
            slot.probe = None
            slot.misses += 1
            what = f"a probe went unanswered for {self.timeouts.probe.within}"
            if slot.misses >= 2:
                self._dead(slot, f"frozen: {what}, twice")
            elif slot.state != "suspect":
                slot.before_suspect = slot.state
                self._set(slot, "suspect", what)
            return
        slot.probe = None
        try:
            health = ray.get(done[0])
        except Exception as exc:
            if actor_died(exc):
                self._dead(slot, f"its process died ({describe(exc)})", alive=False)
            else:
                slot.misses += 1
                if slot.misses >= 2:
                    self._dead(slot, f"its probe failed twice ({describe(exc)})")
                elif slot.state != "suspect":
                    slot.before_suspect = slot.state
                    self._set(slot, "suspect", f"its probe failed ({describe(exc)})")
            return
        if health["state"] == "dead":
            self._dead(slot, health["last_error"] or "its engine core died")
        elif health["incarnation"] != slot.incarnation:
            self._dead(slot, "it was restarted outside the supervisor")
        else:
            slot.misses = 0
            if slot.state == "suspect":
                self._set(slot, slot.before_suspect, "answers again")

    # ---- what clients and senders call ----------------------------------------------------------

    def roster(self) -> dict[str, Any]:
        with self.lock:
            return {"epoch": self.epoch, "version": self.version, "failed": self.failed,
                    "engines": [{"index": s.index, "state": s.state, "incarnation": s.incarnation,
                                 "version": s.version, "reason": s.reason} for s in self.slots]}

    def wait_change(self, epoch: int, timeout_s: float) -> dict[str, Any]:
        """The roster once its epoch is past `epoch`, or after `timeout_s`."""
        with self.lock:
            self.changed.wait_for(lambda: self.epoch != epoch or self.failed, timeout=timeout_s)
            return self.roster()

    def report(self, index: int, incarnation: str | None, reason: str) -> None:
        """A real call to engine `index` (of `incarnation`) failed because its process is gone."""
        with self.lock:
            slot = self.slots[index]
            if slot.incarnation == incarnation and slot.state in MEMBERS:
                self._dead(slot, reason, alive=False)

    def synced(self, version: int, members: list[tuple[int, str]]) -> None:
        """A push of `version` completed on these (engine, incarnation) members: they serve it."""
        with self.lock:
            self.version = max(self.version, version)
            for index, incarnation in members:
                slot = self.slots[index]
                if slot.incarnation == incarnation and slot.state in MEMBERS:
                    slot.version = version
                    if slot.state != "healthy":
                        self._set(slot, "healthy", f"synced to v{version}", version=version)
                    else:
                        self.epoch += 1
                        self.changed.notify_all()

    def unsynced(self, members: list[tuple[int, str]], reason: str) -> None:
        """A push failed: these members' weights are undefined (stale) until a push reaches them."""
        with self.lock:
            for index, incarnation in members:
                slot = self.slots[index]
                if slot.incarnation == incarnation and slot.state in SERVING:
                    self._set(slot, "stale", reason)

    def settle(self, timeout_s: float) -> dict[str, Any]:
        """The roster once no engine is dead or restarting (every one is a member or failed), or the
        fleet failed, or after `timeout_s`."""
        def settled():
            return self.failed or all(s.state in MEMBERS or s.state == "failed" for s in self.slots)

        with self.lock:
            self.changed.wait_for(settled, timeout=timeout_s)
            return self.roster()

    def events_since(self, n: int) -> list[dict[str, Any]]:
        with self.lock:
            return self.events[n:]

    def stop(self) -> None:
        self.stopped.set()


class Roster:
    """A fleet without supervision (benchmark sinks, tests): every engine a member, nothing restarted."""

    def __init__(self, engines: int):
        self.version, self.epoch, self.failed = 0, 0, None
        self.states = ["healthy"] * engines

    def roster(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "version": self.version, "failed": None,
                "engines": [{"index": i, "state": s, "incarnation": None, "version": self.version, "reason": None}
                            for i, s in enumerate(self.states)]}

    def synced(self, version: int, members) -> None:
        self.version = max(self.version, version)

    def unsynced(self, members, reason: str) -> None:
        pass

    def report(self, index: int, incarnation, reason: str) -> None:
        pass
