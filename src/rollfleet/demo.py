"""`rollfleet demo` / `make demo`: the embedded default, on this machine, no GPU, no downloads.

The same runtime as in the image (launch.run: placement groups, async engine actors, the trainer
group, the sync group, the built-in GRPO trainer) on a local Ray, with the values of
manifests/examples/local.yaml: 2 trainer ranks (FSDP2 over gloo) + 2 engines, a tiny random Qwen2
built on the fly, and the CPU STAND-IN engine over gloo in place of vLLM over NCCL. Ray starts only
what the demo needs (no dashboard) and waits longer for its own processes on a loaded machine.
"""

from __future__ import annotations

import os
import sys
from importlib import resources

LOCAL_VALUES = "local.yaml"
COLOCATED_VALUES = "local-colocated.yaml"  # `rollfleet demo --colocated`
RAY_ENV = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
           # the raylet waits this long for its agents (30 s by default): a loaded 2-core machine needs more
           "RAY_raylet_start_wait_time_s": "120"}


def local_spec(sets: list[str] = (), colocated: bool = False):
    from rollfleet.values import load_values

    name = COLOCATED_VALUES if colocated else LOCAL_VALUES
    with resources.as_file(resources.files("rollfleet") / "examples" / name) as path:
        return load_values(path, list(sets))


def start_local_ray(spec, extra_cpus: int = 2, runtime_env: dict | None = None, runs: int = 1):
    """A local Ray whose custom resources mirror the pools: `trainer` and `inference` slots, room for
    `runs` fleets of `spec` at once."""
    for k, v in RAY_ENV.items():
        os.environ.setdefault(k, v)
    import ray

    # address="local": always a new local Ray, never one found via `ray start` or RAY_ADDRESS
    ranks = spec.trainer_pool.gpus
    ray.init(address="local", num_cpus=runs * (spec.engines + ranks) + extra_cpus, num_gpus=0,
             resources={"trainer": runs * ranks, "inference": runs * spec.inference_pool.gpus},
             include_dashboard=False, logging_level="ERROR", log_to_driver=True, runtime_env=runtime_env)
    return ray


def add_command(sub, func) -> None:
    p = sub.add_parser("demo", help="run the runtime on a local Ray with CPU stand-in engines (no GPU)")
    p.add_argument("--set", action="append", default=[], metavar="PATH=VALUE",
                   help="override a value of the local profile, e.g. --set job.steps=5")
    p.add_argument("--colocated", action="store_true",
                   help="the colocated layout (manifests/examples/local-colocated.yaml): each trainer rank and its "
                        "engine share a slot, the engine sleeps while the rank trains, weights through shared memory")
    p.add_argument("--kill-engine", type=int, metavar="STEP",
                   help="a fault on purpose: SIGKILL engine 0 once step STEP is done (--colocated: while it sleeps); "
                        "the run must still complete every step, with every request accounted for, and prints "
                        "how long recovery took")
    p.add_argument("--plot", metavar="PNG", default="rollfleet-demo.png",
                   help="where to write the run's plot: reward, tokens/s, staleness and push time per step "
                        "(default %(default)s; '' for none)")
    p.set_defaults(func=func)


def main(args) -> int:
    from rollfleet.runtime import launch, tiny

    colocated = getattr(args, "colocated", False)
    spec = local_spec(args.set, colocated)
    if colocated:
        print(f"rollfleet demo (colocated): {spec.engines} slots, each a trainer rank + a CPU STAND-IN engine "
              f"(shared memory in place of CUDA IPC), {spec.job.steps} synchronous GRPO steps, model "
              f"{spec.model.name}", flush=True)
    else:
        print(f"rollfleet demo: {spec.engines} engines (CPU STAND-IN for vLLM, gloo in place of NCCL) + "
              f"{spec.trainer_pool.gpus} trainer ranks, {spec.job.steps} asynchronous GRPO steps, model "
              f"{spec.model.name}", flush=True)
    model = str(tiny.ensure())
    try:
        ray = start_local_ray(spec)
    except ModuleNotFoundError:
        raise  # the CLI names the extra to install
    except Exception as exc:  # Ray's own processes did not come up: one line, and what to do
        print(f"error: the local Ray did not start ({type(exc).__name__}: {str(exc).strip().splitlines()[-1]}); "
              f"on a loaded machine retry, or raise RAY_raylet_start_wait_time_s (now "
              f"{os.environ['RAY_raylet_start_wait_time_s']})", file=sys.stderr)
        return 1
    kill = getattr(args, "kill_engine", None)
    if kill is not None and not 1 <= kill < spec.job.steps:
        print(f"error: --kill-engine {kill}: give a step from 1 to {spec.job.steps - 1} (job.steps={spec.job.steps}), "
              f"so that a step follows the fault", file=sys.stderr)
        ray.shutdown()
        return 2
    plot = getattr(args, "plot", "")

    def report(rows):
        if plot and rows:
            from rollfleet import report as plots

            title = f"rollfleet demo: {spec.job.steps} steps, sync.inflight={spec.sync.inflight}"
            print(f"[rollfleet] plot: {plots.write_plot(rows, plot, title)}", flush=True)

    try:
        return launch.run(spec, model, kill_engine_at=kill, on_rows=report)
    finally:
        ray.shutdown()


if __name__ == "__main__":
    import argparse

    sys.exit(main(argparse.Namespace(set=[], colocated=False, kill_engine=None, plot="")))
