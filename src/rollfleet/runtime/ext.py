"""vLLM worker extension: plain methods that `collective_rpc` calls in every TP worker.

Passed to vLLM as `worker_extension_cls="rollfleet.runtime.ext.WeightSyncExtension"`; the policy
(buckets, versions, checks) lives in sync.py and engine.py. Benchmarks and tests run their own
functions in the workers through `collective_rpc(callable)` instead of methods here.
"""

from __future__ import annotations

import time

import torch

from rollfleet.runtime import sync


class WeightSyncExtension:
    def rollfleet_join(self, host: str, port: int, position: int, tp_size: int, world_size: int,
                       timeout_s: float) -> int:
        """Join a (new) sync group as rank 1 + position·TP + (this worker's TP rank). Returns the rank."""
        tp_rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        rank = sync.rank_of(position, tp_rank, tp_size)
        sync.retire(getattr(self, "rollfleet_transport", None))  # a former group (formed again after a fault)
        self.rollfleet_transport = sync.join("nccl", host, port, rank, world_size, self.device, timeout_s)
        return rank

    def rollfleet_probe(self) -> int:
        """The supervisor's liveness probe: a round trip through the engine core to this worker."""
        import os

        return os.getpid()

    def rollfleet_receive(self, push: dict, timeout_s: float) -> dict:
        """Receive one push bucket by bucket, handing views of each bucket to the model's
        load_weights. Returns this worker's checksums and its receive time (the push profile)."""
        model = self.model_runner.model
        t0 = time.perf_counter()
        sums = sync.receive(sync.Push.from_wire(push), self.rollfleet_transport,
                            lambda weights: model.load_weights(weights=weights), time.monotonic() + timeout_s)
        return {"checksums": sums, "seconds": time.perf_counter() - t0}

    def rollfleet_ipc_load(self, msg: dict) -> dict:
        """One colocated handoff call: open the trainer rank's CUDA IPC handles (once), load views of
        them with load_weights (ipc.load)."""
        from rollfleet.runtime import ipc

        model = self.model_runner.model
        cache = self.__dict__.setdefault("rollfleet_ipc_cache", {})
        return ipc.load(msg, cache, lambda weights: model.load_weights(weights=weights), self.device)
