"""Functions run inside every engine worker through `Fleet.call(fn, ...)` (vLLM's
`collective_rpc(callable)`; the CPU stand-in calls them on its core). Benchmarks and tests use them;
the production classes carry no bench-only methods."""

from __future__ import annotations

import time
from typing import Any


def _model_params(worker) -> dict[str, Any]:
    model = worker.model_runner.model if hasattr(worker, "model_runner") else worker.model
    return dict(model.named_parameters())


def _transport(worker):
    return getattr(worker, "rollfleet_transport", None) or worker.transport


def param_sums(worker, names: list[str]) -> dict[str, float]:
    """float64 sums of the named parameters this worker holds (a TP worker holds shards)."""
    return {n: float(p.detach().double().sum()) for n, p in _model_params(worker).items() if n in names}


def raw_broadcast(worker, nbytes: int, iters: int, timeout_s: float) -> float:
    """The ceiling: take part in `iters` raw broadcasts of one `nbytes` buffer from rank 0 (after one
    warm-up); seconds per broadcast. Rank 0 calls `broadcast_ceiling` with the same arguments."""
    return broadcast_ceiling(_transport(worker), nbytes, iters, timeout_s)


def broadcast_ceiling(transport, nbytes: int, iters: int, timeout_s: float) -> float:
    import torch

    deadline = time.monotonic() + timeout_s
    buf = torch.empty(nbytes, dtype=torch.uint8, device=transport.device)
    transport.finish([transport.broadcast(buf)], deadline, "raw broadcast warm-up")
    t0 = time.perf_counter()
    transport.finish([transport.broadcast(buf) for _ in range(iters)], deadline, "raw broadcast")
    return (time.perf_counter() - t0) / iters


def ceiling(fleet, sender, nbytes: int, iters: int) -> float:
    """Rank 0's side: seconds per raw broadcast of one `nbytes` buffer to every engine worker of
    `fleet`, on the sync group the pushes use, in the same run."""
    import ray

    futures = [e.call.remote(raw_broadcast, nbytes, iters, sender.timeout_s) for e in fleet.engines]
    seconds = broadcast_ceiling(sender.transport, nbytes, iters, sender.timeout_s)
    ray.get(futures, timeout=sender.timeout_s)
    return seconds
