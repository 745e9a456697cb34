"""The training loop's runs the tests share (conftest.py's `loop_runs`, once per session): the learning
proof's (test_learning.py) in every layout, with one engine killed mid-run, and a real Prometheus
scraping the local Ray's metrics endpoint throughout (test_metrics.py reads it afterwards).

The four runs go at once, on one local Ray, in threads of this process (about 2 minutes on 2 cores;
one after another they take 3 and a half)."""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from rollfleet import demo
from rollfleet.render import render_objects
from rollfleet.runtime import launch, tiny, trainer
from rollfleet.spec import load_spec

ROOT = Path(__file__).resolve().parents[1]
STEPS = 20
KILL_AT = 6  # engine 0 of this run is SIGKILLed after its step 6: recovery inside a run that must still learn
RUNS = {  # name: (colocated, --set overrides)
    "dedicated-2-ranks-abort-staleness-1": (False, ["sync.inflight=abort", "rollout.maxStaleness=1"]),
    "colocated-2-ranks-wait-staleness-0": (True, ["sync.inflight=wait"]),
    "dedicated-1-rank-keep-staleness-2": (False, ["sync.inflight=keep", "rollout.maxStaleness=2",
                                                  "pools.trainer.gpusPerNode=1"]),
}
KILLED = "dedicated-2-ranks-abort-staleness-1"
BROKEN = "dedicated-1-rank-keep-staleness-2"  # run again with the test double in its engines ("broken")
DOUBLE = [f"env.PYTHONPATH={ROOT / 'tests' / 'doubles'}", "env.ROLLFLEET_TEST_SHIFT=model.embed_tokens.weight"]


# The alerts of the runs' fleet (all four are named "local"), as rendered: Prometheus evaluates them
# throughout; restarts: 1, so the killed engine's restart must fire RollfleetEngineRestarting.
ALERTS = {"name": "local", "rollout": {"maxStaleness": 1}, "monitoring": {"alerts": {"enabled": True, "restarts": 1}}}


def alert_rules(values: dict = ALERTS) -> dict:
    """The rendered PrometheusRule's spec: a Prometheus rule file."""
    (rule,) = [o for o in render_objects(load_spec(values)) if o["kind"] == "PrometheusRule"]
    return rule["spec"]


TRAINED: list[float] = []  # when each run's last step was in, its fleet still up (launch.run's on_rows)


def run(colocated: bool, sets: list[str], kill_at: int | None) -> tuple[list[dict], tuple[bool, str]]:
    """The rows of one run and its verdict."""
    spec = demo.local_spec([f"job.steps={STEPS}", *sets], colocated=colocated)
    rows: list[dict] = []

    def done(out: list[dict]) -> None:
        TRAINED.append(time.time())
        rows.extend(out)

    launch.run(spec, str(tiny.ensure()), kill_engine_at=kill_at, on_rows=done)
    assert len(rows) == STEPS
    return rows, trainer.verdict(rows, spec.rollout.max_staleness)


def run_all(workdir: Path) -> dict:
    """Every run's (rows, verdict), or the exception it raised; "prometheus": the server that scraped
    them (None where it is not installed), or the exception that stopped it; "rules": its rule file;
    "alive_at": a time when every run was training, its gauges fresh (the first run's last step: a gauge's
    series ends with the process that set it); "ended_at": when every run had ended and been scraped."""
    from prometheus import Prometheus

    cases = {**RUNS, "broken": (RUNS[BROKEN][0], RUNS[BROKEN][1] + DOUBLE)}
    tiny.ensure()  # built once, before the threads
    os.environ["RAY_metrics_report_interval_ms"] = "1000"  # workers hand their metrics to the agent every 1 s
    ray = demo.start_local_ray(demo.local_spec(), runs=len(cases))
    out: dict = {"prometheus": None, "rules": workdir / "rules.yml"}
    out["rules"].write_text(json.dumps(alert_rules()))  # YAML is a superset of JSON
    try:
        node = ray.nodes()[0]
        try:
            out["prometheus"] = Prometheus(f"{node['NodeManagerAddress']}:{node['MetricsExportPort']}", workdir,
                                           rules=out["rules"])
        except FileNotFoundError:
            pass
        except Exception as exc:
            out["prometheus"] = exc
        with ThreadPoolExecutor(len(cases)) as pool:
            futures = {name: pool.submit(run, *case, KILL_AT if name == KILLED else None)
                       for name, case in cases.items()}
            out.update({name: f.exception() or f.result() for name, f in futures.items()})
        time.sleep(3)  # the last values reach the agent (1 s) and a scrape (1 s) before the actors are gone
        out["ended_at"] = time.time()
        out["alive_at"] = min(TRAINED, default=out["ended_at"])
    finally:
        ray.shutdown()
        os.environ.pop("RAY_metrics_report_interval_ms", None)
    return out
