"""The RayJob entrypoint: `python -m rollfleet.runtime.launch --config /etc/rollfleet/fleet.json`.

Starts the engines on the inference pool and the trainer group on the trainer pool, then runs
`job.entrypoint` (`module:function`, called as `function(ctx)` on every trainer rank; trainer_group.py)
or, when it is unset, the built-in GRPO trainer (trainer.py), printing its per-step table as it goes
and ending with its verdict (did the reward rise).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

from rollfleet.spec import FleetSpec, SpecError, load_spec


def kill_engine(fleet, engine: int, asleep: bool = False) -> dict[str, Any]:
    """A fault, on purpose (`rollfleet demo --kill-engine`): SIGKILL engine `engine`'s process (this
    node's). `asleep`: first wait (up to timeouts.healthSeconds) until it sleeps while its rank trains
    (the colocated layout's fault). Returns when and what was killed."""
    deadline = time.monotonic() + fleet.spec.timeouts.health_seconds
    while True:
        health = fleet.health()[engine]
        if not asleep or health["state"] == "asleep" or time.monotonic() > deadline:
            break
        time.sleep(0.02)
    os.kill(health["pid"], signal.SIGKILL)
    print(f"[rollfleet] fault: engine {engine} (pid {health['pid']}) killed with SIGKILL while {health['state']}",
          flush=True)
    return {"t": time.time(), "engine": engine, "pid": health["pid"], "state": health["state"]}


def recovery_summary(events: list[dict[str, Any]], fault: dict[str, Any]) -> str:
    """Detect, restart and re-sync times of the engine killed by `fault`, from the supervisor's events."""
    mine = [e for e in events if e["engine"] == fault["engine"] and e["t"] >= fault["t"]]
    first = {}
    for e in mine:
        first.setdefault(e["state"], e)
    if "dead" not in first:
        return f"engine {fault['engine']}: no fault detected after the kill"
    parts = [f"detected after {first['dead']['t'] - fault['t']:.2f} s ({first['dead']['what']})"]
    if "stale" in first or "healthy" in first:
        up = first.get("stale") or first["healthy"]
        parts.append(f"restarted and loaded in {up['t'] - first['dead']['t']:.2f} s")
    synced = next((e for e in mine if e["state"] == "healthy" and e["t"] >= first["dead"]["t"]), None)
    if synced:
        parts.append(f"serving again {synced['t'] - fault['t']:.2f} s after the kill ({synced['what']})")
    return f"engine {fault['engine']}: " + ", ".join(parts)


def run(spec: FleetSpec, model: str | None = None, kill_engine_at: int | None = None,
        on_rows: Callable[[list[dict[str, Any]]], None] | None = None) -> int:
    """Start the fleet and the trainer group on the connected Ray cluster, run the trainer.
    `kill_engine_at`: SIGKILL engine 0 once that step's row is in (the demo's fault); `on_rows`: the
    built-in trainer's rows at the end (the demo's report)."""
    from rollfleet.runtime import metrics, tiny, trainer
    from rollfleet.runtime.fleet import Fleet
    from rollfleet.runtime.trainer_group import BUILTIN, TrainerGroup

    model = model or tiny.resolve(spec.model.name)
    metrics.watch_endpoints()
    group = TrainerGroup.start(spec)  # first: colocated engines go next to their ranks, on their GPUs
    fleet = None
    try:
        fleet = Fleet.start(spec, model, trainers=group)
        if spec.job.entrypoint:  # rank 0's return: an int is the exit code, anything else is printed
            result = group.run(fleet, spec.job.entrypoint, timeout_s=spec.job.active_deadline_seconds,
                               setting="job.activeDeadlineSeconds")
            if isinstance(result, int) and not isinstance(result, bool):
                return result
            if result is not None:
                print("ROLLFLEET_RESULT " + json.dumps(result, default=str), flush=True)
            return 0
        t0 = time.monotonic()
        ranks = spec.trainer_pool.gpus
        print(f"trainer group: {ranks} rank(s); " + (
            f"weights sharded with FSDP2 (fully_shard per decoder layer + root) across the {ranks} ranks, gradients "
            f"averaged, gathered tensor by tensor for each push from rank 0" if ranks > 1 else
            "weights unsharded on the one rank"), flush=True)
        print(f"[rollfleet] built-in GRPO trainer: {spec.job.steps} steps of the toy task (reward: the share of "
              f"even token ids; chance is about 0.5), sync.inflight={spec.sync.inflight}, "
              f"rollout.maxStaleness={spec.rollout.max_staleness}", flush=True)
        print(trainer.table_header(), flush=True)
        faults: list[dict[str, Any]] = []

        def on_report(row: dict[str, Any]) -> None:
            print(trainer.table_row(row), flush=True)
            if kill_engine_at is not None and row["step"] == kill_engine_at and not faults:
                faults.append(kill_engine(fleet, 0, asleep=fleet.layout.colocated))

        # every wait inside a step is bounded by the sync and health timeouts; this bounds the whole run
        budget = spec.timeouts.init_seconds + spec.job.steps * (spec.sync.timeout_seconds + 3 * spec.timeouts.health_seconds)
        rows = group.run(fleet, BUILTIN, on_report=on_report, timeout_s=budget,
                         setting="initSeconds + steps × (sync.timeoutSeconds + 3 × healthSeconds)")
        ok, why = trainer.verdict(rows, spec.rollout.max_staleness)
        for fault in faults:
            print(f"[rollfleet] recovery: {recovery_summary(fleet.events(), fault)}", flush=True)
        if rows:
            requests = rows[-1]["requests"]
            print(f"[rollfleet] requests: {requests['submitted']} submitted, {requests['completed']} completed, "
                  f"{requests['failed']} failed, {requests['resent']} re-sent after engine faults", flush=True)
        print(f"[rollfleet] {len(rows)} steps in {time.monotonic() - t0:.1f} s: {'PASS' if ok else 'FAIL'}: {why}",
              flush=True)
        if on_rows is not None:
            on_rows(rows)
        print("ROLLFLEET_RESULT " + json.dumps(rows), flush=True)
        return 0 if ok else 1
    finally:
        if fleet is not None:
            fleet.shutdown()
        group.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m rollfleet.runtime.launch")
    parser.add_argument("--config", required=True, help="runtime config JSON (the ConfigMap's fleet.json)")
    parser.add_argument("--address", default="auto", help="Ray address (default: the cluster this job runs in)")
    args = parser.parse_args(argv)
    try:
        spec = load_spec(json.loads(Path(args.config).read_text()))
    except SpecError as exc:
        for line in exc.problems:
            print(f"error: {args.config}: {line}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as exc:  # missing/unreadable file, invalid JSON
        print(f"error: {args.config}: {exc}", file=sys.stderr)
        return 2
    import ray

    ray.init(address=args.address, log_to_driver=True)
    return run(spec)


if __name__ == "__main__":
    sys.exit(main())
