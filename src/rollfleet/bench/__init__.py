"""`rollfleet bench`: speed is measured here and written down (docs/benchmarks.md), never asserted
in tests. `sync` runs here on the CPU (gloo); `gpu` and `rollout` need a GPU host with vLLM."""

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
    p.set_defaults(func=func)


def main(args) -> int:
    if args.which == "sync":
        from rollfleet.bench.cpu import bench_sync, print_sync

        result = bench_sync(args)
        print_sync(result)
    else:
        from rollfleet.bench.gpu import bench_gpu

        result = bench_gpu(args)
        print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0
