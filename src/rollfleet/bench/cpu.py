"""`rollfleet bench sync` (CPU, here): push bandwidth against the raw gloo broadcast ceiling measured
in the same run, at several model sizes. Receivers are `SyncSink` actors, a STAND-IN for engines
that joins the group like an engine and loads into plain tensors instead of a model."""

from __future__ import annotations

import statistics
import time
from typing import Any

from rollfleet.bench.workers import ceiling


def cpu_params(total_mib: int) -> list[tuple[str, Any]]:
    """Transformer-like float32 tensors adding up to ~total_mib: 4 MiB matrices plus small vectors."""
    import torch

    out, layer = [], 0
    while sum(t.numel() * 4 for _, t in out) < total_mib << 20:
        out.append((f"layers.{layer}.weight", torch.randn(1024, 1024)))
        out.append((f"layers.{layer}.norm", torch.randn(1024)))
        layer += 1
    return out


class SyncSink:
    """Bench-only STAND-IN receiver: joins the gloo group as an engine would and loads each push into
    plain tensors (the stand-in for load_weights)."""

    def __init__(self, index: int, timeout_s: float):
        import torch

        torch.set_num_threads(1)
        self.index, self.timeout_s, self.tensors, self.transport = index, timeout_s, {}, None

    def join(self, host: str, port: int, world_size: int, position: int) -> list[int]:
        import torch

        from rollfleet.runtime import sync

        rank = sync.rank_of(position, 0, 1)
        self.transport = sync.join("gloo", host, port, rank, world_size, torch.device("cpu"), self.timeout_s)
        return [rank]

    def _load(self, weights) -> None:
        for name, t in weights:
            if name not in self.tensors:
                self.tensors[name] = t.clone()
            else:
                self.tensors[name].copy_(t)

    def receive(self, push) -> dict[str, Any]:
        from rollfleet.runtime import sync
        from rollfleet.runtime.push import Push

        t0 = time.perf_counter()
        sums = sync.receive(Push.from_wire(push), self.transport, self._load, time.monotonic() + self.timeout_s)
        return {"engine": self.index, "version": push.version, "checksums": [sums], "policy": push.inflight,
                "paused_seconds": time.perf_counter() - t0, "worker_seconds": time.perf_counter() - t0}

    def call(self, fn, *args) -> list[Any]:
        return [fn(self, *args)]


def bench_sync(args) -> dict[str, Any]:
    import ray
    import torch

    from rollfleet import demo
    from rollfleet.runtime.fleet import Fleet

    spec = demo.local_spec([f"pools.inference.gpusPerNode={args.engines}", f"sync.bucketMiB={args.bucket_mib}",
                            "sync.timeoutSeconds=120"])
    demo.start_local_ray(spec)
    try:
        sinks = [ray.remote(SyncSink).options(num_cpus=1, resources={"inference": 1}).remote(i, 120)
                 for i in range(spec.engines)]
        fleet = Fleet(spec, sinks, [])
        sender = fleet.sender("cpu")
        rows = []
        for size in args.sizes_mib:
            params = cpu_params(size)
            nbytes = sum(t.numel() * t.element_size() for _, t in params)
            raw = ceiling(fleet, sender, nbytes, args.repeat)
            stats = [sender.push(params) for _ in range(args.repeat)]
            push = statistics.median(s.seconds for s in stats)
            rows.append({"size_mib": round(nbytes / 2**20), "tensors": len(params), "buckets": stats[0].buckets,
                         "engines": spec.engines, "ceiling_s": round(raw, 4),
                         "ceiling_gbps": round(nbytes / raw / 1e9, 3), "push_s": round(push, 4),
                         "push_gbps": round(nbytes / push / 1e9, 3), "of_ceiling": round(raw / push, 3),
                         "checksums_ok": all(s.checksums_ok for s in stats)})
        return {"bench": "sync", "transport": "gloo (CPU stand-in for NCCL)", "torch": torch.__version__,
                "ray": ray.__version__, "bucket_mib": args.bucket_mib, "rows": rows}
    finally:
        ray.shutdown()


def print_sync(result: dict[str, Any]) -> None:
    cols = ["size_mib", "tensors", "buckets", "engines", "ceiling_gbps", "push_gbps", "of_ceiling", "checksums_ok"]
    print(f"bench sync: {result['transport']}, torch {result['torch']}, ray {result['ray']}, "
          f"bucket {result['bucket_mib']} MiB; push vs raw broadcast of the same bytes, same group")
    print("  ".join(f"{c:>12}" for c in cols))
    for r in result["rows"]:
        print("  ".join(f"{str(r[c]):>12}" for c in cols))
