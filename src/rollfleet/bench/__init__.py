"""`rollfleet bench`: speed is measured here and written down (docs/benchmarks.md), never asserted
in tests. `sync` runs here on the CPU (gloo); `gpu`, `rollout` and `colocated` need a GPU host with vLLM."""

from __future__ import annotations

import json
from pathlib import Path


def _ints(value: str) -> list[int]:
    return [int(x) for x in value.split(",")]


def add_command(sub, func) -> None:
    from rollfleet.bench.gpu import SHAPES

    p = sub.add_parser("bench", help="measure push bandwidth vs the raw transport ceiling, and rollout throughput")
    which = p.add_subparsers(dest="which", required=True)
    s = which.add_parser("sync", help="CPU: gloo push vs raw broadcast at several sizes (stand-in receivers)")
    s.add_argument("--sizes-mib", type=_ints, default=[16, 64, 256])
    s.add_argument("--engines", type=int, default=2)
    s.add_argument("--bucket-mib", type=int, default=32)
    s.add_argument("--repeat", type=int, default=3)
    s.add_argument("--json", help="also write the results here")
    g = which.add_parser("gpu", help="GPU host: real vLLM engines; ceiling, push, memory, baseline, fan-out")
    g.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-7b")
    g.add_argument("--engines", type=_ints, default=[1, 2])
    g.add_argument("--tp", type=int, default=1)
    g.add_argument("--bucket-mib", type=int, default=1024)
    g.add_argument("--repeat", type=int, default=5)
    g.add_argument("--workdir", default="/tmp/rollfleet-bench")
    g.add_argument("--profile", action="store_true", help="also: the ceiling at the bucket size, other bucket sizes")
    g.add_argument("--skip-baseline", action="store_true", help="skip the per-tensor baseline")
    g.add_argument("--json", help="also write the results here")
    r = which.add_parser("rollout", help="GPU host: a long-tail GRPO workload, batch vs async vs bare AsyncLLM, "
                                         "and the push cost per in-flight policy (with a trainer GPU)")
    r.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    r.add_argument("--steps", type=int, default=3)
    r.add_argument("--prompts", type=int, default=64)
    r.add_argument("--samples", type=int, default=8)
    r.add_argument("--median-tokens", type=int, default=300)
    r.add_argument("--max-tokens", type=int, default=4096)
    r.add_argument("--sigma", type=float, default=0.8, help="of the log-normal response lengths")
    r.add_argument("--inflight", type=int, default=512, help="samples in flight (async and bare)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--push-every", type=float, default=2.0, help="seconds between pushes (with a trainer GPU)")
    r.add_argument("--skip-push", action="store_true")
    r.add_argument("--workdir", default="/tmp/rollfleet-bench")
    r.add_argument("--json", help="also write the results here")
    r.add_argument("--plot", metavar="PNG", default="rollfleet-bench-rollout.png",
                   help="where to write the plot: tokens/s per path, push and pause times per policy ('' for none)")
    c = which.add_parser("colocated", help="one GPU: the colocated push vs the on-GPU copy ceiling, sleep/wake, memory")
    c.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-7b")
    c.add_argument("--repeat", type=int, default=5)
    c.add_argument("--gpu-memory-utilization", type=float, default=0.45)
    c.add_argument("--workdir", default="/tmp/rollfleet-bench")
    c.add_argument("--json", help="also write the results here")
    p.set_defaults(func=func)


def main(args) -> int:
    if args.which == "sync":
        from rollfleet.bench.cpu import bench_sync, print_sync

        result = bench_sync(args)
        print_sync(result)
    else:
        from rollfleet.bench import colocated, gpu, rollout

        run = {"gpu": gpu.bench_gpu, "rollout": rollout.bench_rollout, "colocated": colocated.bench_colocated}
        result = run[args.which](args)
        print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    if args.which == "rollout" and args.plot:
        from rollfleet.report import write_rollout_plot

        print(f"plot: {write_rollout_plot(result, args.plot)}")
    return 0
