"""The runtime's waits, built once from the spec: each knows its seconds and the setting that sets
them, so every deadline and every message comes from one place."""

from __future__ import annotations

import dataclasses
import time

from rollfleet.spec import FleetSpec

SLACK_SECONDS = 5.0  # how much longer a caller waits for a callee that enforces the same timeout itself


@dataclasses.dataclass(frozen=True)
class Timeout:
    seconds: float
    setting: str  # the values field, e.g. "sync.timeoutSeconds"

    def deadline(self) -> float:
        """time.monotonic() at which this wait is over."""
        return time.monotonic() + self.seconds

    @property
    def outer(self) -> float:
        """What a caller waits for a callee that enforces this timeout itself (it reports first)."""
        return self.seconds + SLACK_SECONDS

    @property
    def within(self) -> str:
        return f"{self.seconds:g} s ({self.setting})"

    def error(self, what: str, fix: str = "") -> TimeoutError:
        """`what` did not finish in time: one line naming the setting to raise."""
        return TimeoutError(f"{what} did not finish within {self.within}; "
                            + (fix or f"raise {self.setting} or check the logs of what it waited for"))


@dataclasses.dataclass(frozen=True)
class Timeouts:
    init: Timeout  # engine start: placement, model load, profile
    health: Timeout  # a control call, and the longest a rollout client waits without a result
    sync: Timeout  # the weight-sync group: rendezvous and each push
    probe: Timeout  # one engine liveness probe (recovery)

    @classmethod
    def of(cls, spec: FleetSpec) -> Timeouts:
        t, r = spec.timeouts, spec.recovery
        return cls(Timeout(t.init_seconds, "timeouts.initSeconds"), Timeout(t.health_seconds, "timeouts.healthSeconds"),
                   Timeout(spec.sync.timeout_seconds, "sync.timeoutSeconds"),
                   Timeout(r.probe_timeout_seconds, "recovery.probeTimeoutSeconds"))
