"""rollfleet's metrics, through Ray's metrics API (`ray.util.metrics`), as KubeRay expects.

Every process records its own; each node's Ray metrics agent exports them on the node's metrics port
(8080 in the RayCluster: rayStartParams metrics-export-port), where Prometheus scrapes them. The agent
runs in Ray's dashboard agent (ray[default]) and has been seen not to start on a GPU host: `watch_endpoints`
says so in one line, naming the node, instead of leaving the dashboards silently empty. Ray prefixes every
application metric with `ray_`: `rollfleet_push_seconds` is scraped as `ray_rollfleet_push_seconds_bucket`
and so on (`exported`). vLLM's own metrics reach the same endpoint as `ray_vllm_*` through vLLM's Ray
stat logger (engine.py); the CPU stand-in records the same vLLM names (standin.py).

METRICS is the one list: what each metric is, its kind and labels; docs/monitoring.md, the dashboard
and the alerts use these names, and tests/test_metrics.py scrapes every one from a real Prometheus.
Recording never raises and costs nothing outside Ray (unit tests run the engine's parts in-process).
"""

from __future__ import annotations

import os
import threading
import time
import urllib.request
from typing import Any

FLEET, ENGINE = ("fleet",), ("fleet", "engine")
STATES = ("healthy", "suspect", "dead", "restarting", "stale", "failed")  # the supervisor's (supervisor.py)
SECONDS = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600]
BYTES = [1e6, 1e7, 1e8, 1e9, 1e10, 1e11]
STALENESS = [0.5, 1.5, 2.5, 3.5, 4.5, 8.5, 16.5]  # Ray's boundaries must be > 0: le="0.5" counts staleness 0

# name: (kind, help, labels, histogram boundaries)
METRICS: dict[str, tuple[str, str, tuple[str, ...], list[float] | None]] = {
    # the engines (engine.py's Scheduler, one process per engine: vLLM or the stand-in alike)
    "rollfleet_requests_received": ("counter", "Requests (a prompt with its n samples) an engine received", ENGINE, None),
    "rollfleet_requests_completed": ("counter", "Requests an engine answered with every sample", ENGINE, None),
    "rollfleet_requests_failed": ("counter", "Requests an engine answered with an error", ENGINE, None),
    "rollfleet_requests_in_flight": ("gauge", "Requests an engine is generating now", ENGINE, None),
    "rollfleet_requests_queued": ("gauge", "Requests on an engine waiting for admission or for the end of a push",
                                  ENGINE, None),
    "rollfleet_tokens_generated": ("counter", "Completion tokens an engine generated", ENGINE, None),
    "rollfleet_weight_version": ("gauge", "The weight version an engine serves", ENGINE, None),
    "rollfleet_pause_seconds": ("histogram", "How long a push paused an engine's generation (sync.inflight)",
                                ENGINE, SECONDS),
    # the supervisor (supervisor.py)
    "rollfleet_engine_state": ("gauge", "1 for an engine's current state (healthy, suspect, dead, restarting, "
                                        "stale, failed), 0 for the others", ENGINE + ("state",), None),
    "rollfleet_engine_restarts": ("counter", "Times the supervisor replaced an engine", ENGINE, None),
    # the rollout clients and the push (rollout.py, trainer_group.py)
    "rollfleet_requests_resent": ("counter", "Requests a client sent again after their engine failed", FLEET, None),
    "rollfleet_sample_staleness": ("histogram", "Versions between the policy trained and the oldest weights of "
                                               "each group taken for it", FLEET, STALENESS),
    "rollfleet_push_seconds": ("histogram", "A weight push end to end (gather, send, load, reset)", FLEET, SECONDS),
    "rollfleet_push_bytes": ("histogram", "Bytes of one weight push", FLEET, BYTES),
    # the trainer: whatever ctx.report gets on rank 0 (trainer_group.py)
    "rollfleet_trainer_step": ("gauge", "The last training step reported", FLEET, None),
    "rollfleet_step_seconds": ("histogram", "Time between two reported steps", FLEET, SECONDS),
    "rollfleet_loss": ("gauge", "The loss of the last reported step", FLEET, None),
    "rollfleet_reward": ("gauge", "The mean reward of the last reported step", FLEET, None),
    "rollfleet_last_step_timestamp_seconds": ("gauge", "Unix time of the last reported step", FLEET, None),
}

# The CPU stand-in records these vLLM metrics (the names vLLM's Ray stat logger gives them: `vllm:` → `vllm_`;
# labels model_name and engine, which is vLLM's own engine index, 0 for each rollfleet engine).
VLLM_LABELS = ("model_name", "engine")
VLLM = {
    "vllm_num_requests_running": ("gauge", "Sequences decoding now (the stand-in's)", VLLM_LABELS, None),
    "vllm_num_requests_waiting": ("gauge", "Sequences waiting for admission (the stand-in's)", VLLM_LABELS, None),
    "vllm_kv_cache_usage_perc": ("gauge", "Share of the stand-in's prefix-cache entries in use", VLLM_LABELS, None),
    "vllm_prompt_tokens": ("counter", "Prompt tokens prefilled (the stand-in's)", VLLM_LABELS, None),
    "vllm_generation_tokens": ("counter", "Tokens generated (the stand-in's)", VLLM_LABELS, None),
    "vllm_prefix_cache_queries": ("counter", "Prompt tokens looked up in the prefix cache (the stand-in's)",
                                  VLLM_LABELS, None),
    "vllm_prefix_cache_hits": ("counter", "Prompt tokens found in the prefix cache (the stand-in's)", VLLM_LABELS, None),
    "vllm_e2e_request_latency_seconds": ("histogram", "A request from arrival to its last sample (the stand-in's)",
                                         VLLM_LABELS, SECONDS),
}


def exported(name: str) -> str:
    """The series Prometheus scrapes from Ray's endpoint: `ray_` first; a counter's ends in `_total`; a
    histogram has `_bucket`, `_sum` and this one, `_count` (Ray 2.52+, its OpenTelemetry exporter)."""
    kind = (METRICS.get(name) or VLLM[name])[0]
    return f"ray_{name}" + {"counter": "_total", "histogram": "_count", "gauge": ""}[kind]


_made: dict[str, Any] = {}
_lock = threading.Lock()
_broken: set[str] = set()


def _metric(name: str) -> Any:
    """This process's metric `name`, or None outside a Ray worker or driver."""
    made = _made.get(name)
    if made is not None:
        return made
    import ray

    if not ray.is_initialized():
        return None
    from ray.util import metrics

    kind, doc, labels, bounds = METRICS.get(name) or VLLM[name]
    with _lock:
        if name not in _made:
            _made[name] = (metrics.Histogram(name, doc, boundaries=bounds, tag_keys=labels) if kind == "histogram"
                           else getattr(metrics, kind.capitalize())(name, doc, tag_keys=labels))
        return _made[name]


def _record(name: str, how: str, value: float, tags: dict[str, Any]) -> None:
    if name in _broken:
        return
    try:
        metric = _metric(name)
        if metric is not None:
            getattr(metric, how)(value, tags={k: str(v) for k, v in tags.items()})
    except Exception as exc:  # a metric must never break the run: say it once, then drop that metric
        _broken.add(name)
        print(f"[rollfleet] metrics: {name} is not recorded in this process ({type(exc).__name__}: {exc})", flush=True)


def zero(name: str, **tags: Any) -> None:
    """A counter's series from the start, at 0 (Prometheus' advice: no series missing until the first
    event), through Ray's own record path: its inc() refuses 0."""
    _record(name, "_record", 0.0, tags)


def inc(name: str, value: float = 1.0, **tags: Any) -> None:
    if value > 0:
        _record(name, "inc", value, tags)


# Ray exports a gauge only in the report (RAY_metrics_report_interval_ms, 10 s by default) after it was
# set: one set once, and its series is gone from the endpoint a report later (measured on Ray 2.60). A
# state held for an hour (an engine failed for good; no step since) would vanish exactly when an alert
# needs it. So every gauge this process set is set again, with its last value, twice per report interval.
_gauges: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
_keeper: list[threading.Thread] = []


def _keep_interval_s() -> float:
    try:
        report_ms = float(os.environ.get("RAY_metrics_report_interval_ms") or 10000)
    except ValueError:
        report_ms = 10000.0
    return max(0.25, report_ms / 2000)


def _keep_gauges() -> None:
    every = _keep_interval_s()
    while True:
        time.sleep(every)
        with _lock:
            held = list(_gauges.items())
        for (name, tags), value in held:
            _record(name, "set", value, dict(tags))


def set(name: str, value: float, **tags: Any) -> None:  # noqa: A001 (the metric verb)
    _record(name, "set", value, tags)
    if name in _made:  # recorded through Ray: keep its series alive until the process ends
        with _lock:
            _gauges[(name, tuple(sorted((k, str(v)) for k, v in tags.items())))] = value
            if not _keeper:
                _keeper.append(threading.Thread(target=_keep_gauges, name="rollfleet-gauges", daemon=True))
                _keeper[0].start()


def observe(name: str, value: float, **tags: Any) -> None:
    _record(name, "observe", value, tags)


def engine_state(fleet: str, engine: int, state: str) -> None:
    for s in STATES:
        set("rollfleet_engine_state", float(s == state), fleet=fleet, engine=engine, state=s)


class StepClock:
    """The trainer's metrics from the rows rank 0 reports (the built-in trainer's, or a user's own:
    whichever of step, loss and reward a row has)."""

    def __init__(self, fleet: str):
        self.fleet, self.last = fleet, None

    def row(self, row: dict[str, Any]) -> None:
        now = time.monotonic()
        if self.last is not None:
            observe("rollfleet_step_seconds", now - self.last, fleet=self.fleet)
        self.last = now
        for key, name in (("step", "rollfleet_trainer_step"), ("loss", "rollfleet_loss"), ("reward", "rollfleet_reward")):
            if isinstance(row.get(key), (int, float)) and not isinstance(row.get(key), bool):
                set(name, float(row[key]), fleet=self.fleet)
        set("rollfleet_last_step_timestamp_seconds", time.time(), fleet=self.fleet)


def silent_endpoints(nodes: list[dict[str, Any]], timeout_s: float, poll_s: float = 2.0) -> list[str]:
    """The metrics URLs of `nodes` (ray.nodes()' entries) that did not answer within `timeout_s`."""
    urls = {f"http://{n['NodeManagerAddress']}:{n['MetricsExportPort']}/metrics" for n in nodes if n.get("Alive")}
    deadline = time.monotonic() + timeout_s
    while True:
        for url in sorted(urls):
            try:
                with urllib.request.urlopen(url, timeout=min(5.0, max(timeout_s, 0.1))) as answer:
                    answer.read(1)
                urls.discard(url)
            except OSError:
                pass
        if not urls or time.monotonic() >= deadline:
            return sorted(urls)
        time.sleep(poll_s)


def watch_endpoints(timeout_s: float = 60.0) -> threading.Thread:
    """In the background: one line for each node whose Ray metrics endpoint does not answer within
    `timeout_s` (the run goes on; its table and ROLLFLEET_RESULT carry the numbers regardless)."""
    import ray

    def watch() -> None:
        try:
            silent = silent_endpoints(ray.nodes(), timeout_s)
        except Exception as exc:  # never break the run over its metrics
            silent = [f"(not checked: {type(exc).__name__}: {exc})"]
        for url in silent:
            print(f"[rollfleet] metrics: Ray's metrics endpoint {url} did not answer within {timeout_s:.0f} s: "
                  f"nothing recorded on that node reaches Prometheus. Ray's metrics agent runs in its dashboard "
                  f"agent (needs ray[default], as the image has); see /tmp/ray/session_latest/logs/"
                  f"dashboard_agent.log on that node", flush=True)

    thread = threading.Thread(target=watch, name="rollfleet-metrics-watch", daemon=True)
    thread.start()
    return thread
