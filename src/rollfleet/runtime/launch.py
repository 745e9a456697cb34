"""The RayJob entrypoint: `python -m rollfleet.runtime.launch --config /etc/rollfleet/fleet.json`.

Starts the engines on the inference pool, then runs the trainer on the trainer pool: the built-in
GRPO-shaped smoke trainer, or `job.entrypoint` (`module:function`, called as `function(fleet, spec)`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path

from rollfleet.spec import FleetSpec, SpecError, load_spec, runtime_config


def run(spec: FleetSpec, model: str | None = None) -> int:
    """Start the fleet on the connected Ray cluster and run the trainer. Returns an exit code."""
    import ray

    from rollfleet.runtime import placement, tiny
    from rollfleet.runtime.fleet import Fleet
    from rollfleet.runtime.trainer import SmokeTrainer, passed, table

    model = model or tiny.resolve(spec.model.name)
    fleet = Fleet.start(spec, model)
    try:
        if spec.job.entrypoint:
            module, _, func = spec.job.entrypoint.partition(":")
            result = getattr(importlib.import_module(module), func)(fleet, spec)
            return int(result or 0)
        trainer = ray.remote(SmokeTrainer).options(**placement.trainer_options(spec)).remote(
            runtime_config(spec), model)
        t0 = time.monotonic()
        # every step is bounded by the sync and health timeouts; this bounds the whole run
        budget = spec.timeouts.init_seconds + spec.job.steps * (spec.sync.timeout_seconds + 3 * spec.timeouts.health_seconds)
        ready, _ = ray.wait([ref := trainer.run.remote(fleet, spec.job.steps)], timeout=budget)
        if not ready:
            print(f"[rollfleet] smoke trainer did not finish within {budget} s "
                  f"(initSeconds + steps × (sync.timeoutSeconds + 3 × healthSeconds))", file=sys.stderr)
            return 1
        rows = ray.get(ref)
        print(table(rows), flush=True)
        print(f"[rollfleet] {len(rows)} steps in {time.monotonic() - t0:.1f} s: "
              f"{'PASS' if passed(rows) else 'FAIL'}", flush=True)
        print("ROLLFLEET_RESULT " + json.dumps(rows), flush=True)
        return 0 if passed(rows) else 1
    finally:
        fleet.shutdown()


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
