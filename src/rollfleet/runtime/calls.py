"""Ray calls to engines and trainer ranks: wait for one call per callee with a deadline, and name
the callee that failed or is late, never a healthy one."""

from __future__ import annotations

import time
from typing import Any, Callable


DEATH_NOTICE_SECONDS = 3.0  # how long Ray may take to report a killed callee's death after its peers noticed


class EngineStartError(RuntimeError):
    """An engine failed its start for its own reason (the model, the memory): a restart fails alike."""


def describe(exc: BaseException, limit: int = 500) -> str:
    """The root cause of a Ray error, one line (Ray's own long texts on a lost actor: their first clause)."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    line = text[-1] if text else ""
    if actor_died(cause):
        line = line.split(". ")[0].split(": RpcError")[0][:160]
    return f"{type(cause).__name__}: {line}"[:limit]


def actor_died(exc: BaseException) -> bool:
    """The callee's process is gone (killed, crashed, its node lost) or is being restarted by Ray."""
    import ray.exceptions as rex

    return isinstance(exc, (rex.RayActorError, getattr(rex, "ActorUnavailableError", rex.RayActorError)))


def gather(futures: list[Any], deadline: float | None, what: str, within: str,
           name: Callable[[int], str] = "engine {}".format, failed: type[Exception] = RuntimeError,
           late: type[Exception] = TimeoutError, tick: Callable[[], None] = lambda: None) -> list[Any]:
    """The results of `futures` (one per callee: `name(position)`) by `deadline` (None: no deadline,
    the callees' own waits bound them). The first failure is `failed`, naming its callee; the
    deadline is `late`, naming the ones still out and `within` (the setting). `tick()` runs at least
    every 0.2 s."""
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
            raise late(f"{what}: {names} did not answer within {within}; raise it or check their logs")
        for f in ready:
            try:
                results[index[f]] = ray.get(f)
            except Exception as exc:
                culprit, cause = _culprit(index[f], exc, pending, index)
                raise failed(f"{what}: {name(culprit)} failed: {describe(cause)}") from None
    return [results[i] for i in range(len(futures))]


def _culprit(position: int, exc: BaseException, pending: list[Any], index: dict[Any, int]) -> tuple[int, BaseException]:
    """Who to name for a failure: a callee whose process died within DEATH_NOTICE_SECONDS of it, if
    one did (a peer's error in a collective, "connection closed by peer", is only its echo), else the
    callee that failed."""
    if not actor_died(exc):
        for i, other in failures(pending, DEATH_NOTICE_SECONDS):
            if actor_died(other):
                return index[pending[i]], other
    return position, exc


def failures(futures: list[Any], timeout_s: float = 0.0) -> list[tuple[int, BaseException]]:
    """(position, error) of each of `futures` that failed within `timeout_s` (0: already), in order."""
    import ray

    if not futures:
        return []
    done, _ = ray.wait(list(futures), num_returns=len(futures), timeout=timeout_s)
    out = []
    for i, f in enumerate(futures):
        if f in done:
            try:
                ray.get(f)
            except Exception as exc:
                out.append((i, exc))
    return out


def first_failure(futures: list[Any], name: Callable[[int], str] = "engine {}".format) -> str | None:
    """'<callee>: <cause>' of the first of `futures` that already failed, else None (never waits)."""
    found = failures(futures)
    return f"{name(found[0][0])}: {describe(found[0][1])}" if found else None
