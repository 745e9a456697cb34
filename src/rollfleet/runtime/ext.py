"""vLLM worker extension: plain methods that `LLM.collective_rpc` calls in every TP worker.

Passed to vLLM as `worker_extension_cls="rollfleet.runtime.ext.WeightSyncExtension"`; the policy
(buckets, versions, checks) lives in sync.py and engine.py.
"""

from __future__ import annotations

import time

import torch

from rollfleet.runtime import sync


class WeightSyncExtension:
    def rollfleet_join(self, host: str, port: int, engine: int, tp_size: int, world_size: int,
                       timeout_s: float) -> int:
        """Join the sync group as rank 1 + engine·TP + (this worker's TP rank). Returns the rank."""
        tp_rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        rank = sync.rank_of(engine, tp_rank, tp_size)
        self.rollfleet_transport = sync.join("nccl", host, port, rank, world_size, self.device, timeout_s)
        return rank

    def rollfleet_receive(self, plan: dict, timeout_s: float) -> dict:
        """Receive one push into two bucket buffers, handing views to the model's load_weights.
        Returns this worker's checksums and its receive time (the push profile)."""
        model = self.model_runner.model
        t0 = time.perf_counter()
        sums = sync.receive(sync.Plan.from_wire(plan), self.rollfleet_transport,
                            lambda weights: model.load_weights(weights=weights), time.monotonic() + timeout_s)
        return {"checksums": sums, "seconds": time.perf_counter() - t0}

    def rollfleet_raw_broadcast(self, nbytes: int, iters: int, timeout_s: float) -> float:
        """Benchmark ceiling: join `iters` raw broadcasts of one buffer (no packing, no loading)."""
        return sync.raw_broadcast(self.rollfleet_transport, nbytes, iters, time.monotonic() + timeout_s)

    def rollfleet_param_sums(self, names: list[str]) -> dict[str, float]:
        """float64 sums of named engine parameters on this TP rank (tests compare unsharded ones)."""
        params = dict(self.model_runner.model.named_parameters())
        return {n: float(params[n].detach().double().sum()) for n in names if n in params}
