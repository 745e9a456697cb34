"""The weight-sync group: trainer rank 0 + every engine worker, and the bucketed push over it.

Ranks: trainer = 0; engine i, TP rank t = 1 + i·TP + t. World size = 1 + engines × TP.
Transports: NCCL (`StatelessProcessGroup` + `PyNcclCommunicator`, vLLM's public building blocks) on
GPUs; gloo (`torch.distributed.ProcessGroupGloo` on its own TCPStore) for the CPU stand-in.

A push is one broadcast stream from rank 0 that every receiver joins, so k engines cost one
broadcast, not k. Tensors are packed into buckets; two buffers let packing (sender) and loading
(receivers) overlap the broadcast of the neighbouring bucket. Receivers hand views of the bucket to
`load_fn` (vLLM's `load_weights`, which shards for TP and fuses qkv / gate_up itself).
"""

from __future__ import annotations

import dataclasses
import threading
import time
from datetime import timedelta
from typing import Any, Callable, Iterable

import torch

ALIGN = 256  # byte alignment of every tensor inside a bucket (keeps views aligned for any dtype)
JOIN_KEY = "rollfleet/joined/{}"


class SyncError(RuntimeError):
    """The sync group failed: the message names the engine / rank and the setting to change."""


def rank_of(engine: int, tp_rank: int, tp_size: int) -> int:
    return 1 + engine * tp_size + tp_rank


def describe_rank(rank: int, tp_size: int) -> str:
    if rank == 0:
        return "rank 0 (trainer)"
    engine, tp_rank = divmod(rank - 1, tp_size)
    return f"rank {rank} (engine {engine}, TP rank {tp_rank})"


# ---------------------------------------------------------------------------------------------
# The bucket plan: sent once per push, in the single control call each engine gets.


@dataclasses.dataclass(frozen=True)
class Slot:
    name: str
    dtype: str  # e.g. "bfloat16"
    shape: tuple[int, ...]
    offset: int
    nbytes: int


@dataclasses.dataclass(frozen=True)
class Bucket:
    nbytes: int
    slots: tuple[Slot, ...]


@dataclasses.dataclass(frozen=True)
class Plan:
    version: int
    buckets: tuple[Bucket, ...]
    verify: bool
    load: bool = True  # False only in `bench gpu --profile`: isolates the transport from load_weights

    def to_wire(self) -> dict[str, Any]:
        """Plain data for RPC layers that do not keep dataclasses (vLLM's collective_rpc)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_wire(cls, data: Plan | dict[str, Any]) -> Plan:
        if isinstance(data, Plan):
            return data
        buckets = tuple(Bucket(b["nbytes"], tuple(Slot(s["name"], s["dtype"], tuple(s["shape"]), s["offset"], s["nbytes"])
                                                   for s in b["slots"])) for b in data["buckets"])
        return cls(data["version"], buckets, data["verify"], data.get("load", True))

    @property
    def buffer_bytes(self) -> int:
        return max((b.nbytes for b in self.buckets), default=0)

    @property
    def total_bytes(self) -> int:
        return sum(s.nbytes for b in self.buckets for s in b.slots)


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def plan_buckets(tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int, version: int,
                 verify: bool) -> Plan:
    """Greedy packing in parameter order; a tensor larger than a bucket gets a bucket of its own."""
    buckets: list[Bucket] = []
    slots: list[Slot] = []
    used = 0
    for name, t in tensors:
        nbytes = t.numel() * t.element_size()
        if slots and used + nbytes > bucket_bytes:
            buckets.append(Bucket(used, tuple(slots)))
            slots, used = [], 0
        slots.append(Slot(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), used, nbytes))
        used = _align(used + nbytes)
    if slots:
        buckets.append(Bucket(used, tuple(slots)))
    return Plan(version, tuple(buckets), verify)


def view(buffer: torch.Tensor, slot: Slot) -> torch.Tensor:
    """A view of `slot` inside a uint8 bucket buffer, with the tensor's dtype and shape."""
    return buffer[slot.offset:slot.offset + slot.nbytes].view(getattr(torch, slot.dtype)).view(slot.shape)


def checksum(buffer: torch.Tensor) -> torch.Tensor:
    """Sum of the bucket's 64-bit words, wrapping mod 2^64 (one native pass, on CPU and GPU alike;
    catches truncation and corrupted bytes). Buckets are ALIGN-padded, so the view always fits."""
    return buffer.view(torch.int64).sum()


# ---------------------------------------------------------------------------------------------
# Transports. `broadcast` is asynchronous; `wait` enforces a deadline (never hangs).


class Transport:
    rank: int
    world_size: int
    device: torch.device

    def broadcast(self, tensor: torch.Tensor, after: Any = None) -> Any:
        """Start broadcasting `tensor` from rank 0, after event/handle `after`; returns a handle."""
        raise NotImplementedError

    def ready(self, handle: Any, deadline: float, what: str) -> None:
        """Make later work on this rank wait for `handle` (GPU: stream wait; CPU: blocking wait)."""
        raise NotImplementedError

    def mark(self) -> Any:
        """A handle for the work enqueued so far on the compute stream (None on CPU)."""
        return None

    def finish(self, handles: list[Any], deadline: float, what: str,
               failed: Callable[[], str | None] = lambda: None) -> None:
        """Wait until every handle completed; `failed()` names a peer known to be dead."""
        for h in handles:
            self.ready(h, deadline, what)


class GlooTransport(Transport):
    """CPU stand-in for NCCL: gloo over its own TCPStore (never the default process group)."""

    def __init__(self, store, rank: int, world_size: int, timeout_s: float):
        from torch import distributed as dist

        self.rank, self.world_size, self.device = rank, world_size, torch.device("cpu")
        self._opts = dist.BroadcastOptions()
        self._opts.rootRank = 0
        self.group = dist.ProcessGroupGloo(dist.PrefixStore("rollfleet/gloo", store), rank, world_size,
                                           timedelta(seconds=timeout_s))

    def broadcast(self, tensor, after=None):
        return self.group.broadcast([tensor], self._opts)

    def ready(self, handle, deadline, what):
        left = max(deadline - time.monotonic(), 0.001)
        try:
            handle.wait(timedelta(seconds=left))
        except RuntimeError as exc:  # gloo reports timeouts and closed peers as RuntimeError
            raise SyncError(f"{what}: {exc}") from exc


class NcclTransport(Transport):
    """NCCL through vLLM's PyNcclCommunicator on a StatelessProcessGroup (no global torch state)."""

    def __init__(self, group, device: torch.device):
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator

        self.rank, self.world_size, self.device = group.rank, group.world_size, device
        self.comm = PyNcclCommunicator(group, device=device)
        self.stream = torch.cuda.Stream(device=device)

    def broadcast(self, tensor, after=None):
        if after is not None:
            self.stream.wait_event(after)
        self.comm.broadcast(tensor, src=0, stream=self.stream)
        return self.stream.record_event()

    def ready(self, handle, deadline, what):
        torch.cuda.current_stream(self.device).wait_event(handle)

    def mark(self):
        return torch.cuda.current_stream(self.device).record_event()

    def finish(self, handles, deadline, what, failed=lambda: None):
        checked = time.monotonic()
        for h in handles:
            while not h.query():  # poll: a dead peer must surface as an error, never a hang
                now = time.monotonic()
                if now > deadline:
                    raise SyncError(f"{what}: NCCL did not complete before the deadline "
                                    f"(sync.timeoutSeconds); the group is broken, restart the fleet")
                if now - checked > 0.05:
                    checked = now
                    problem = failed()
                    if problem:
                        raise SyncError(f"{what}: {problem}; the group is broken, restart the fleet")
                time.sleep(0.0002)


# ---------------------------------------------------------------------------------------------
# Rendezvous: rank 0 owns a TCPStore on an ephemeral port (picked by the kernel: no race).


def open_store(host: str, world_size: int, timeout_s: float):
    """Rank 0: a TCPStore bound to an ephemeral port on `host`. Returns (store, port)."""
    from torch.distributed import TCPStore

    store = TCPStore(host, 0, world_size, is_master=True, wait_for_workers=False,
                     timeout=timedelta(seconds=timeout_s), use_libuv=False)
    return store, store.port


def connect_store(host: str, port: int, world_size: int, timeout_s: float):
    from torch.distributed import TCPStore

    return TCPStore(host, port, world_size, is_master=False, timeout=timedelta(seconds=timeout_s),
                    use_libuv=False)


def announce(store, rank: int) -> None:
    store.set(JOIN_KEY.format(rank), "1")


def wait_joined(store, world_size: int, tp_size: int, timeout_s: float,
                failed: Callable[[], str | None] = lambda: None) -> None:
    """Rank 0 waits until every rank announced itself; the error names the ranks that never joined."""
    deadline = time.monotonic() + timeout_s
    missing = list(range(1, world_size))
    while missing:
        missing = [r for r in missing if not store.check([JOIN_KEY.format(r)])]
        problem = failed()
        if problem:
            raise SyncError(f"sync group rendezvous failed: {problem}")
        if missing and time.monotonic() > deadline:
            names = ", ".join(describe_rank(r, tp_size) for r in missing)
            raise SyncError(f"sync group rendezvous: {names} never joined within sync.timeoutSeconds="
                            f"{timeout_s:g} s; check that engine's log, or raise sync.timeoutSeconds")
        time.sleep(0.01)


def with_deadline(fn: Callable[[], Any], timeout_s: float, what: str) -> Any:
    """Run a blocking constructor (NCCL/gloo init) in a thread so a missing peer cannot hang us."""
    box: dict[str, Any] = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # re-raised in the caller's thread
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True, name=f"rollfleet-{what}")
    t.start()
    t.join(timeout_s)
    if t.is_alive():
        raise SyncError(f"{what} did not finish within sync.timeoutSeconds={timeout_s:g} s")
    if "error" in box:
        raise box["error"]
    return box["value"]


def make_transport(backend: str, store, rank: int, world_size: int, device: torch.device,
                   timeout_s: float) -> Transport:
    if backend == "gloo":
        return GlooTransport(store, rank, world_size, timeout_s)
    from vllm.distributed.utils import StatelessProcessGroup

    # vLLM 0.14.1's dataclass has a required `socket` field (None unless rank 0 owns it); 0.20.2 dropped it
    extra = {"socket": None} if "socket" in {f.name for f in dataclasses.fields(StatelessProcessGroup)} else {}
    group = StatelessProcessGroup(rank=rank, world_size=world_size, store=store, **extra)
    with torch.cuda.device(device):  # may run in a helper thread (with_deadline): pin the device
        return NcclTransport(group, device)


def join(backend: str, host: str, port: int, rank: int, world_size: int, device: torch.device,
         timeout_s: float) -> Transport:
    """Receiver side: connect to rank 0's store, announce, and build the transport."""
    store = connect_store(host, port, world_size, timeout_s)
    announce(store, rank)
    return with_deadline(lambda: make_transport(backend, store, rank, world_size, device, timeout_s),
                         timeout_s, f"sync group join of rank {rank}")


# ---------------------------------------------------------------------------------------------
# The data path.


def send(plan: Plan, tensors: list[torch.Tensor], transport: Transport, deadline: float,
         failed: Callable[[], str | None] = lambda: None) -> list[int]:
    """Rank 0: pack bucket k+1 while bucket k is on the wire (two buffers). Returns checksums.
    `failed()` is polled while waiting on the GPU, so a dead receiver ends the wait early."""
    device = transport.device
    cuda = device.type == "cuda"
    buffers = [torch.empty(plan.buffer_bytes, dtype=torch.uint8, device=device) for _ in range(2)]
    pack_stream = torch.cuda.Stream(device=device) if cuda else None
    if cuda:  # the optimizer step that produced these tensors runs on the current stream
        pack_stream.wait_stream(torch.cuda.current_stream(device))
    sent: list[Any] = []
    sums: list[torch.Tensor] = []
    index = 0
    for k, bucket in enumerate(plan.buckets):
        buf = buffers[k % 2][:bucket.nbytes]
        if k >= 2:  # this buffer carried bucket k-2: reuse it only once that broadcast is done
            if cuda:
                pack_stream.wait_event(sent[k - 2])
            else:
                transport.ready(sent[k - 2], deadline, f"push v{plan.version} bucket {k - 2}")
        with torch.cuda.stream(pack_stream):  # no-op for None (CPU)
            for slot in bucket.slots:
                src = tensors[index]
                index += 1
                buf[slot.offset:slot.offset + slot.nbytes].copy_(
                    src.detach().reshape(-1).view(torch.uint8), non_blocking=True)
            if plan.verify:
                sums.append(checksum(buf))
            packed = pack_stream.record_event() if cuda else None
        sent.append(transport.broadcast(buf, after=packed))
    transport.finish(sent, deadline, f"push v{plan.version}", failed)
    return [int(s) for s in sums]


def raw_broadcast(transport: Transport, nbytes: int, iters: int, deadline: float) -> float:
    """The ceiling: seconds per broadcast of one `nbytes` buffer (after one warm-up). Every rank
    calls it with the same arguments; rank 0 sends."""
    buf = torch.empty(nbytes, dtype=torch.uint8, device=transport.device)
    transport.finish([transport.broadcast(buf)], deadline, "raw broadcast warm-up")
    t0 = time.perf_counter()
    transport.finish([transport.broadcast(buf) for _ in range(iters)], deadline, "raw broadcast")
    return (time.perf_counter() - t0) / iters


def receive(plan: Plan, transport: Transport, load_fn: Callable[[list[tuple[str, torch.Tensor]]], Any],
            deadline: float) -> list[int]:
    """Receiver: bucket k+1 arrives while bucket k is loaded. Returns the checksums of what arrived."""
    buffers = [torch.empty(plan.buffer_bytes, dtype=torch.uint8, device=transport.device) for _ in range(2)]
    n = len(plan.buckets)
    arrived: list[Any] = []
    loaded: list[Any] = []
    sums: list[torch.Tensor] = []

    def start(k: int):
        # the buffer was last used by bucket k-2, whose load must be enqueued/complete first
        arrived.append(transport.broadcast(buffers[k % 2][:plan.buckets[k].nbytes],
                                           after=loaded[k - 2] if k >= 2 else None))

    if n:
        start(0)
    for k, bucket in enumerate(plan.buckets):
        if k + 1 < n:
            start(k + 1)
        transport.ready(arrived[k], deadline, f"receive v{plan.version} bucket {k}")
        buf = buffers[k % 2][:bucket.nbytes]
        if plan.verify:
            sums.append(checksum(buf))
        if plan.load:
            load_fn([(slot.name, view(buf, slot)) for slot in bucket.slots])
        loaded.append(transport.mark())
    transport.finish([h for h in loaded if h is not None], deadline, f"load v{plan.version}")
    return [int(s) for s in sums]
