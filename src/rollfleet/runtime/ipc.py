"""The colocated weight handoff: a trainer rank shares memory with the engine on its own GPU.

On GPUs: CUDA IPC through torch's own reductions (`reduce_tensor` → a handle the engine's worker opens,
the device found by GPU UUID since device indices differ between processes). On CPU, a labelled
STAND-IN: the tensor lives in torch's shared memory (`file_system` strategy) and the engine maps it.
Either way nothing is copied between the processes: the engine's worker builds views and hands them to
`load_weights`.

Two ways to push (`IpcSender.push`):
* direct: the trainer's model is unsharded on this GPU, so its parameters themselves are shared, one
  handle per tensor, opened once by the engine and reused by every later push (a parameter whose
  storage moved is shared again). One engine call per push; no packing.
* staged: tensors that exist only for the push (gathered from FSDP2 shards, or any iterable) are
  packed into two shared bucket buffers, one engine call per bucket, the next bucket packed while the
  engine loads the last one. Extra memory: two buckets.
The first call of a push wakes the engine's weights (vLLM sleep level 2 discarded them), the last wakes
its KV cache, resets the prefix cache and stamps the version (engine.py `Scheduler.push_ipc`).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, Callable

import torch

from rollfleet.runtime import sync
from rollfleet.runtime.calls import actor_died, describe
from rollfleet.runtime.push import PushStats, full_tensors
from rollfleet.runtime.supervisor import MEMBERS, FleetFailed


def _gpu_uuid(device: torch.device) -> str:
    return str(torch.cuda.get_device_properties(device).uuid)


EXPANDABLE = ("CUDA IPC cannot hand over memory the caching allocator maps with expandable_segments "
              "(pytorch#165685); remove expandable_segments:True from PYTORCH_CUDA_ALLOC_CONF in env")


def share(t: torch.Tensor) -> dict[str, Any]:
    """A picklable handle to `t`'s memory (CUDA IPC; on CPU `t` must be in shared memory)."""
    import os

    from torch.multiprocessing import reductions

    if t.is_cuda:
        if "expandable_segments:true" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", "").replace(" ", "").lower():
            raise sync.SyncError(EXPANDABLE)
        try:
            rebuild, args = reductions.reduce_tensor(t)
        except RuntimeError as exc:
            raise sync.SyncError(f"CUDA IPC: cannot share {tuple(t.shape)} {t.dtype} ({exc}); {EXPANDABLE}") from None
        return {"cuda": True, "rebuild": rebuild, "args": args, "uuid": _gpu_uuid(t.device)}
    if not t.is_shared():
        raise ValueError("a CPU tensor must be in shared memory (share_memory_()) to be handed over")
    import io

    from multiprocessing.reduction import ForkingPickler  # torch registers its reductions on it

    buf = io.BytesIO()
    ForkingPickler(buf).dump(t)  # the storage goes as its shared-memory file name, not its bytes
    return {"cuda": False, "payload": buf.getvalue()}


def open_handle(handle: dict[str, Any]) -> torch.Tensor:
    """The tensor behind `handle`, in this process (the device mapped by GPU UUID)."""
    if not handle["cuda"]:
        import pickle

        return pickle.loads(handle["payload"])
    args = list(handle["args"])
    index = next((i for i in range(torch.cuda.device_count()) if _gpu_uuid(torch.device("cuda", i)) == handle["uuid"]),
                 None)
    if index is None:
        raise RuntimeError(f"CUDA IPC: GPU {handle['uuid']} is not visible in this process; the engine and the "
                           f"trainer rank must share the GPU (the colocated layout places them together)")
    args[6] = index  # storage_device (rebuild_cuda_tensor's 7th argument)
    try:
        return handle["rebuild"](*args)
    except RuntimeError as exc:  # e.g. cudaIpcOpenMemHandle refused by the container's seccomp profile
        raise RuntimeError(f"CUDA IPC: cannot open the trainer rank's memory ({exc}). The trainer rank and the "
                           f"engine must run in one pod (the colocated worker group does); CUDA IPC needs the "
                           f"IPC syscalls the default seccomp profile allows unless expandable segments are on: "
                           f"{EXPANDABLE}") from None


def checksum(t: torch.Tensor) -> int:
    """Sum of the tensor's bytes (int64): what the engine read equals what the trainer wrote."""
    return int(t.detach().reshape(-1).view(torch.uint8).sum(dtype=torch.int64))


def load(msg: dict[str, Any], cache: dict[str, torch.Tensor], load_fn: Callable[[list], Any],
         device: torch.device | None = None) -> dict[str, Any]:
    """The engine worker's side of one call: open the handles it has not seen (kept in `cache`), build
    the tensors or bucket views, `load_fn` them, wait for the device. Returns checksums and seconds."""
    t0 = time.perf_counter()
    for key, handle in msg["handles"].items():
        cache[key] = open_handle(handle)
    if msg.get("buffer") is not None:  # staged: views of a bucket buffer
        buf = cache[msg["buffer"]]
        weights = [(s.name, sync.view(buf, s)) for s in (sync.Slot(*slot) for slot in msg["slots"])]
    else:  # direct: the trainer's own tensors
        weights = [(name, cache[key]) for name, key in msg["tensors"]]
    load_fn(weights)
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)  # loaded before the trainer may change the memory again
    sums = [checksum(t) for _, t in weights] if msg["verify"] else []
    return {"checksums": sums, "seconds": time.perf_counter() - t0}


class IpcSender:
    """A trainer rank's weight handoff to the engine on its own GPU (the colocated layout). After the
    engine was replaced (a new incarnation), every handle is shared with it again."""

    def __init__(self, fleet, engine: int, device: Any):
        if not torch.device(device).type == "cuda":
            import torch.multiprocessing as mp

            mp.set_sharing_strategy("file_system")  # CPU stand-in: handles by shared-memory file name
        self.fleet, self.index, self.device = fleet, engine, torch.device(device)
        self.engine = fleet.engines[engine]
        self.version = fleet.version  # versions only increase over the fleet's life
        self.timeouts = fleet.timeouts
        self.bucket_bytes = fleet.spec.sync.bucket_mib << 20
        self.incarnation: str | None = None  # of the engine the handles below were shared with
        self.shared: dict[str, tuple[tuple, str]] = {}  # name -> (storage identity, handle key) seen by the engine
        self.buffers: list[tuple[torch.Tensor, str] | None] = [None, None]  # staged: (buffer, handle key)

    def _call(self, msg: dict[str, Any]) -> dict[str, Any]:
        return self._resolve(self.engine.receive_ipc.remote(msg), msg["version"])

    def _engine_ready(self) -> None:
        """Wait until this rank's engine is started (it may be being replaced); a new incarnation
        has none of the handles shared with the old one."""
        state = self.fleet.roster()["engines"][self.index]
        if state["state"] not in MEMBERS:
            roster = self.fleet.settle(self.timeouts.init.outer)
            if roster["failed"]:
                raise FleetFailed(roster["failed"])
            state = roster["engines"][self.index]
            if state["state"] not in MEMBERS:
                raise sync.SyncError(f"push: engine {self.index} is {state['state']} ({state['reason']}) after "
                                     f"{self.timeouts.init.within}")
        if state["incarnation"] != self.incarnation:
            self.incarnation, self.shared, self.buffers = state["incarnation"], {}, [None, None]

    def push(self, weights, verify: bool | None = None, version: int | None = None):
        """Hand `weights` (a model, or an iterable of HF-named unsharded tensors) to this rank's engine as
        `version` (default one more than the last)."""
        self._engine_ready()
        verify = self.fleet.spec.sync.verify_checksums if verify is None else verify
        version = self.version + 1 if version is None else version
        members = [(self.index, self.incarnation)]
        t0 = time.perf_counter()
        direct = isinstance(weights, torch.nn.Module) and not any(hasattr(p, "full_tensor")
                                                                  for p in weights.parameters())
        try:
            if direct:
                tensors = [(n, p.detach()) for n, p in weights.named_parameters()]
                acks, sent = self._direct(tensors, version, verify), [checksum(t) for _, t in tensors] if verify else []
                calls, nbytes, count = 1, sum(t.numel() * t.element_size() for _, t in tensors), len(tensors)
            else:
                source = full_tensors(weights) if isinstance(weights, torch.nn.Module) else iter(weights)
                acks, sent, calls, nbytes, count = self._staged(source, version, verify)
            got = [s for a in acks for w in a["workers"] for s in w["checksums"]]
            if verify and got != sent:
                raise sync.SyncError(f"push v{version}: engine {self.index} read other bytes than this rank wrote "
                                     f"(checksums differ); the handoff raced the trainer")
        except sync.SyncError as exc:
            self.fleet.unsynced(members, f"push v{version} failed")
            raise sync.SyncError(f"{exc}; its weights are undefined until a push reaches it") from None
        send_seconds = time.perf_counter() - t0
        self.version = max(self.version, version)
        self.fleet.synced(version, members)
        profile = ({k: v for k, v in acks[-1].items() if k != "workers"},)
        return PushStats(version, nbytes, calls, count, time.perf_counter() - t0, 1, True if verify else None,
                         send_seconds, profile, "direct" if direct else "staged")

    def _direct(self, tensors: list[tuple[str, torch.Tensor]], version: int, verify: bool) -> list[dict]:
        """One call: share what the engine has not seen (or what moved), then every tensor by its key."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # the optimizer step is done before the engine reads
        handles, refs = {}, []
        for name, t in tensors:
            if not t.is_cuda and not t.is_shared():
                t.share_memory_()  # CPU stand-in: once; the parameter stays in shared memory afterwards
            identity = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), str(t.dtype))
            known = self.shared.get(name)
            if known is None or known[0] != identity:
                key = f"{name}@{len(self.shared)}:{version}"
                handles[key] = share(t)
                self.shared[name] = (identity, key)
            refs.append((name, self.shared[name][1]))
        return [self._call({"version": version, "first": True, "last": True, "verify": verify,
                            "handles": handles, "tensors": refs, "buffer": None})]

    def _buffer(self, i: int, nbytes: int) -> tuple[torch.Tensor, str, dict]:
        """Shared bucket buffer i, grown when a tensor needs it: (buffer, its key, handles the engine lacks)."""
        if self.buffers[i] is not None and self.buffers[i][0].numel() >= nbytes:
            return *self.buffers[i], {}
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        buf = torch.empty(max(nbytes, self.bucket_bytes), dtype=torch.uint8, device=self.device)
        if buf.device.type == "cpu":
            buf.share_memory_()
        key = f"bucket-{i}-{buf.numel()}"
        self.buffers[i] = (buf, key)
        return buf, key, {key: share(buf)}

    def _staged(self, source, version: int, verify: bool):
        """Pack into two shared buffers; bucket k+1 is packed while the engine loads bucket k. The first
        call (it wakes the weights) and the last (it finishes the push) go alone, in order."""
        acks: list[dict] = []
        sent: list[int] = []
        pending: dict[int, Any] = {}  # buffer -> the engine call still reading it
        item = next(source, None)
        k = nbytes_total = count = 0
        while True:
            i = k % 2
            if i in pending:  # its last bucket must be loaded before the buffer is reused
                acks.append(self._resolve(pending.pop(i), version))
            first_bytes = item[1].numel() * item[1].element_size() if item is not None else 0
            buf, key, handles = self._buffer(i, sync._align(first_bytes))
            slots, used = [], 0
            while item is not None:
                name, t = item
                slot, _ = sync._slot(name, t, used)
                if slots and used + slot.nbytes > buf.numel():
                    break
                buf[used:used + slot.nbytes].copy_(t.detach().reshape(-1).view(torch.uint8))
                if verify:
                    sent.append(checksum(t))
                slots.append(slot)
                used = sync._align(used + slot.nbytes)
                item = t = None  # dropped before the next one is produced
                item = next(source, None)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # packed before the engine reads
            first, last = k == 0, item is None
            msg = {"version": version, "first": first, "last": last, "verify": verify, "handles": handles,
                   "buffer": key, "slots": [dataclasses.astuple(s) for s in slots]}
            nbytes_total += sum(s.nbytes for s in slots)
            count += len(slots)
            k += 1
            if first or last:
                for j in list(pending):
                    acks.append(self._resolve(pending.pop(j), version))
                acks.append(self._call(msg))
                if last:
                    return acks, sent, k, nbytes_total, count
            else:
                pending[i] = self.engine.receive_ipc.remote(msg)

    def _resolve(self, ref, version: int) -> dict:
        import ray

        try:
            return ray.get(ref, timeout=self.timeouts.sync.outer)
        except Exception as exc:
            if actor_died(exc):
                self.fleet.report(self.index, self.incarnation, f"died in push v{version} ({describe(exc)})")
            raise sync.SyncError(f"push v{version}: engine {self.index} failed: {describe(exc)}") from None
