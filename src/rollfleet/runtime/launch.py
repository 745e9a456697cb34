"""The RayJob entrypoint: `python -m rollfleet.runtime.launch --config /etc/rollfleet/fleet.json`.

Starts the engines on the inference pool and the trainer group on the trainer pool, then runs
`job.entrypoint` (`module:function`, called as `function(ctx)` on every trainer rank; trainer_group.py)
or, when it is unset, the built-in GRPO trainer (trainer.py), printing its per-step table as it goes.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from rollfleet.spec import FleetSpec, SpecError, load_spec


def run(spec: FleetSpec, model: str | None = None) -> int:
    """Start the fleet and the trainer group on the connected Ray cluster, run the trainer."""
    from rollfleet.runtime import tiny, trainer
    from rollfleet.runtime.fleet import Fleet
    from rollfleet.runtime.trainer_group import BUILTIN, TrainerGroup

    model = model or tiny.resolve(spec.model.name)
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
        print(f"[rollfleet] built-in GRPO trainer: {spec.job.steps} steps, sync.inflight={spec.sync.inflight}, "
              f"rollout.maxStaleness={spec.rollout.max_staleness}", flush=True)
        print(trainer.table_header(), flush=True)
        # every wait inside a step is bounded by the sync and health timeouts; this bounds the whole run
        budget = spec.timeouts.init_seconds + spec.job.steps * (spec.sync.timeout_seconds + 3 * spec.timeouts.health_seconds)
        rows = group.run(fleet, BUILTIN, on_report=lambda row: print(trainer.table_row(row), flush=True),
                         timeout_s=budget, setting="initSeconds + steps × (sync.timeoutSeconds + 3 × healthSeconds)")
        ok = trainer.passed(rows, spec.rollout.max_staleness)
        print(f"[rollfleet] {len(rows)} steps in {time.monotonic() - t0:.1f} s: {'PASS' if ok else 'FAIL'}", flush=True)
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
