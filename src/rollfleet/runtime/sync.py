"""The weight-sync group: trainer rank 0 + every engine worker, and the bucketed push over it.

Ranks: trainer = 0; the group's p-th member engine, TP rank t = 1 + p·TP + t. World size = 1 + members ×
TP. A group's world size is fixed when it forms, so after an engine fault it is formed again over the
engines that are members then, on a new port (sender.py), never grown.
Transports: NCCL (`StatelessProcessGroup` + `PyNcclCommunicator`, vLLM's public building blocks) on
GPUs; gloo (`torch.distributed.ProcessGroupGloo` on its own TCPStore) for the CPU stand-in.

A push is one broadcast stream from rank 0 that every receiver joins, so k engines cost one
broadcast, not k. Tensors are packed into buckets; two buffers let packing (sender) and loading
(receivers) overlap the broadcast of the neighbouring bucket. Receivers hand views of the bucket to
`load_fn` (vLLM's `load_weights`, which shards for TP and fuses qkv / gate_up itself).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import threading
import time
from datetime import timedelta
from typing import Any, Callable, Iterable

import torch

from rollfleet.runtime.push import Push

ALIGN = 256  # byte alignment of every tensor inside a bucket (keeps views aligned for any dtype)
JOIN_KEY = "rollfleet/joined/{}"
ABANDONED_KEY = "rollfleet/abandoned"  # rank 0 sets it when a push failed: receivers stop waiting for it
SLICE_SECONDS = 0.5  # how often a receiver blocked on the transport checks whether rank 0 gave up


class SyncError(RuntimeError):
    """The sync group failed: the message names the engine / rank and the setting to change."""


def rank_of(position: int, tp_rank: int, tp_size: int) -> int:
    """The rank of TP worker `tp_rank` of the group's `position`-th engine (engines that are not
    members, e.g. dead ones, take no rank: the group is formed again over the members)."""
    return 1 + position * tp_size + tp_rank


def describe_rank(rank: int, tp_size: int, engines: list[int] | None = None) -> str:
    """`engines[position]` is the engine index of each member (default: position = index)."""
    if rank == 0:
        return "rank 0 (trainer)"
    position, tp_rank = divmod(rank - 1, tp_size)
    engine = engines[position] if engines is not None and position < len(engines) else position
    return f"rank {rank} (engine {engine}, TP rank {tp_rank})"


# ---------------------------------------------------------------------------------------------
# The wire format: each bucket travels behind a small header broadcast (its slots, its size, whether
# it is the last), so the sender packs straight from a lazy iterator (push.Push says why).


@dataclasses.dataclass(frozen=True)
class Slot:
    name: str
    dtype: str  # e.g. "bfloat16"
    shape: tuple[int, ...]
    offset: int
    nbytes: int


def header_bytes(bucket_bytes: int) -> int:
    """Size of the header broadcast before each bucket (both sides derive it from the Push)."""
    return min(256 << 10, max(16 << 10, bucket_bytes // 256))


def encode_header(slots: list[Slot], nbytes: int, last: bool) -> bytes:
    body = json.dumps({"nbytes": nbytes, "last": last,
                       "slots": [[s.name, s.dtype, list(s.shape), s.offset, s.nbytes] for s in slots]}).encode()
    return len(body).to_bytes(8, "little") + body


def decode_header(raw: bytes) -> tuple[list[Slot], int, bool]:
    body = json.loads(raw[8:8 + int.from_bytes(raw[:8], "little")])
    return [Slot(n, d, tuple(sh), o, b) for n, d, sh, o, b in body["slots"]], body["nbytes"], body["last"]


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _slot(name: str, t: torch.Tensor, offset: int) -> tuple[Slot, int]:
    """The slot of `t` at `offset` and the bytes its entry takes in the bucket header."""
    slot = Slot(name, str(t.dtype).removeprefix("torch."), tuple(t.shape), offset, t.numel() * t.element_size())
    return slot, len(json.dumps([slot.name, slot.dtype, list(slot.shape), slot.offset, slot.nbytes])) + 2


# ---------------------------------------------------------------------------------------------
# Transports. `broadcast` is asynchronous; `wait` enforces a deadline (never hangs).


class Transport:
    rank: int
    world_size: int
    device: torch.device
    store: Any = None  # the group's rendezvous store (rank 0 owns it)

    def abandoned(self) -> bool:
        """Rank 0 gave this group up (a push failed), or its store went away with it."""
        if self.store is None or self.rank == 0:
            return False
        try:
            return bool(self.store.check([ABANDONED_KEY]))
        except Exception:  # the store's server is gone: so is rank 0's side of the group
            return True

    def abandon(self) -> None:
        """Rank 0, after a failed push: every receiver's wait ends within SLICE_SECONDS, and the
        transport's pending work is aborted. The group is not used again."""
        try:
            self.store.set(ABANDONED_KEY, "1")
        except Exception:
            pass
        self.abort()

    def abort(self) -> None:
        """End the pending collectives of this rank (NCCL: ncclCommAbort); nothing to do for gloo."""

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

    def fetch(self, handle: Any, tensor: torch.Tensor, deadline: float, what: str) -> bytes:
        """The bytes of `tensor` on the host once broadcast `handle` completed (headers only: it
        waits for the transport, never for work queued on the compute stream)."""
        self.ready(handle, deadline, what)
        return tensor.numpy().tobytes()


class GlooTransport(Transport):
    """CPU stand-in for NCCL: gloo over its own TCPStore (never the default process group)."""

    def __init__(self, store, rank: int, world_size: int, timeout_s: float):
        from torch import distributed as dist

        self.rank, self.world_size, self.device, self.store = rank, world_size, torch.device("cpu"), store
        self._opts = dist.BroadcastOptions()
        self._opts.rootRank = 0
        self.group = dist.ProcessGroupGloo(dist.PrefixStore("rollfleet/gloo", store), rank, world_size,
                                           timedelta(seconds=timeout_s))

    def broadcast(self, tensor, after=None):
        return self.group.broadcast([tensor], self._opts)

    def ready(self, handle, deadline, what):
        self.finish([handle], deadline, what)

    def finish(self, handles, deadline, what, failed=lambda: None):
        for handle in handles:
            # polled, never a blocking timed wait: once one of those times out, gloo may hold the next
            # for the group's whole timeout; a dead peer (`failed`) or a given-up push is seen within a slice
            next_check = time.monotonic() + SLICE_SECONDS
            while not handle.is_completed():
                now = time.monotonic()
                if now >= deadline:
                    raise SyncError(f"{what}: not done before the deadline (sync.timeoutSeconds)")
                if now >= next_check:
                    next_check = now + SLICE_SECONDS
                    problem = failed() or ("rank 0 gave this push up (it failed elsewhere)" if self.abandoned() else None)
                    if problem:
                        raise SyncError(f"{what}: {problem}; the sync group is broken and forms again for the next push")
                time.sleep(0.002)
            try:
                handle.wait()  # completed: returns at once, or raises what went wrong
            except RuntimeError as exc:  # gloo reports closed peers and its own timeouts as RuntimeError
                raise SyncError(f"{what}: {exc}") from exc


class NcclTransport(Transport):
    """NCCL through vLLM's PyNcclCommunicator on a StatelessProcessGroup (no global torch state)."""

    def __init__(self, group, device: torch.device):
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator

        self.rank, self.world_size, self.device, self.store = group.rank, group.world_size, device, group.store
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
                                    f"(sync.timeoutSeconds); the sync group is broken and forms again for the next push")
                if now - checked > 0.05:
                    checked = now
                    problem = failed() or ("rank 0 gave this push up (it failed elsewhere)" if self.abandoned() else None)
                    if problem:
                        self.abort()  # the broadcast will never complete: free this rank's stream
                        raise SyncError(f"{what}: {problem}; the sync group is broken and forms again for the next push")
                time.sleep(0.0002)

    def abort(self):
        """ncclCommAbort (vLLM's wrapper lacks it; it is in the same library): the pending broadcast
        kernels end, so the stream this rank loads weights on is free again."""
        import ctypes

        if getattr(self, "_aborted", False):
            return
        self._aborted = True
        fn = self.comm.nccl.lib.ncclCommAbort
        fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_void_p]
        fn(self.comm.comm)

    def fetch(self, handle, tensor, deadline, what):
        if getattr(self, "_host", None) is None or self._host.numel() < tensor.numel():
            self._host = torch.empty(tensor.numel(), dtype=torch.uint8, pin_memory=True)
        host = self._host[:tensor.numel()]
        with torch.cuda.stream(self.stream):  # behind the broadcast, not behind loads on the compute stream
            host.copy_(tensor, non_blocking=True)
            copied = self.stream.record_event()
        self.finish([copied], deadline, what)
        return host.numpy().tobytes()


# ---------------------------------------------------------------------------------------------
# Rendezvous: rank 0 owns a TCPStore on an ephemeral port (picked by the kernel: no race).


_RETIRED: list[Transport] = []  # groups given up after a fault, kept alive on purpose (see retire)


def retire(transport: Transport | None) -> None:
    """Keep a given-up group's transport referenced for the life of the process: destroying a gloo
    group whose peer died blocks in its destructor, which holds the GIL (the whole process would
    freeze for the group's timeout). It is a few buffers, once per fault."""
    if transport is not None:
        _RETIRED.append(transport)


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
                failed: Callable[[], str | None] = lambda: None, engines: list[int] | None = None) -> None:
    """Rank 0 waits until every rank announced itself; the error names the ranks that never joined."""
    deadline = time.monotonic() + timeout_s
    missing = list(range(1, world_size))
    while missing:
        missing = [r for r in missing if not store.check([JOIN_KEY.format(r)])]
        problem = failed()
        if problem:
            raise SyncError(f"sync group rendezvous failed: {problem}")
        if missing and time.monotonic() > deadline:
            names = ", ".join(describe_rank(r, tp_size, engines) for r in missing)
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


def view(buffer: torch.Tensor, slot: Slot) -> torch.Tensor:
    """A view of `slot` inside a uint8 bucket buffer, with the tensor's dtype and shape."""
    return buffer[slot.offset:slot.offset + slot.nbytes].view(getattr(torch, slot.dtype)).view(slot.shape)


def checksum(buffer: torch.Tensor) -> torch.Tensor:
    """Sum of the bucket's 64-bit words, wrapping mod 2^64 (one native pass, on CPU and GPU alike;
    catches truncation and corrupted bytes). Buckets are ALIGN-padded, so the view always fits."""
    return buffer.view(torch.int64).sum()


@dataclasses.dataclass(frozen=True)
class Sent:
    checksums: list[int]
    bytes: int
    buckets: int
    tensors: int


class _Buffers:
    """Two bucket buffers, grown (never shrunk) when a tensor exceeds the bucket size."""

    def __init__(self, bucket_bytes: int, device: torch.device):
        self.bucket_bytes, self.device = bucket_bytes, device
        self.buffers: list[torch.Tensor | None] = [None, None]

    def get(self, k: int, nbytes: int) -> torch.Tensor:
        """Buffer k % 2, at least `nbytes` long (the whole buffer: slice it to the bucket)."""
        buf = self.buffers[k % 2]
        if buf is None or buf.numel() < nbytes:
            if buf is not None and self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # the old buffer may still be read (rare: oversized tensor)
            buf = self.buffers[k % 2] = torch.empty(max(nbytes, self.bucket_bytes, ALIGN), dtype=torch.uint8,
                                                    device=self.device)
        return buf


def send(push: Push, named_tensors: Iterable[tuple[str, torch.Tensor]], transport: Transport, deadline: float,
         failed: Callable[[], str | None] = lambda: None) -> Sent:
    """Rank 0: pull tensors lazily and pack each into the bucket at once, so at most one source
    tensor is alive (the one read ahead); bucket k+1 is packed while bucket k is on the wire (two
    buffers), each behind its header. Extra memory: two buckets + the largest tensor. Greedy in
    iteration order; a tensor larger than a bucket gets one of its own; a bucket also closes when
    its header is full. `failed()` is polled while waiting on the GPU (a dead receiver ends it)."""
    device = transport.device
    cuda = device.type == "cuda"
    hsize = header_bytes(push.bucket_bytes)
    buffers = _Buffers(push.bucket_bytes, device)
    headers = [torch.zeros(hsize, dtype=torch.uint8, device=device) for _ in range(2)]
    hosts = [torch.zeros(hsize, dtype=torch.uint8, pin_memory=True) for _ in range(2)] if cuda else headers
    pack_stream = torch.cuda.Stream(device=device) if cuda else None
    # per buffer (k % 2): the header copy, header broadcast and data broadcast of its last bucket
    copied: list[Any] = [None, None]
    heads: list[Any] = [None, None]
    sent: list[Any] = [None, None]
    sums: list[int] = []
    nbytes_total = count = 0
    source = iter(named_tensors)
    pending = next(source, None)
    for k in itertools.count():
        i = k % 2
        if k >= 2:  # buffers i carried bucket k-2: reuse them only once its broadcast is done
            if cuda:
                copied[i].synchronize()
                pack_stream.wait_event(sent[i])
            else:
                transport.finish([heads[i], sent[i]], deadline, f"push v{push.version} bucket {k - 2}", failed)
            if push.verify:
                sums[k - 2] = int(sums[k - 2])  # long done: no sync
        first = pending[1].numel() * pending[1].element_size() if pending is not None else 0
        buf = buffers.get(k, _align(first))
        slots: list[Slot] = []
        used, header = 0, 64  # 64: the header's fixed JSON and length prefix
        while pending is not None:
            name, t = pending
            slot, entry = _slot(name, t, used)
            if entry + 64 > hsize:
                raise SyncError(f"weight {name[:100]!r}: its name and shape do not fit a bucket header "
                                f"({hsize} bytes); raise sync.bucketMiB")
            if slots and (used + slot.nbytes > push.bucket_bytes or header + entry > hsize):
                break
            if cuda:  # t was produced on the current stream (an optimizer step, a gather)
                pack_stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(pack_stream):  # no-op for None (CPU)
                buf[used:used + slot.nbytes].copy_(t.detach().reshape(-1).view(torch.uint8), non_blocking=True)
            if cuda:
                t.record_stream(pack_stream)  # a transient (gathered) tensor is not reused under the copy
            slots.append(slot)
            used, header = _align(used + slot.nbytes), header + entry
            pending = t = None  # dropped before the next one is produced
            pending = next(source, None)
        last = pending is None
        raw = encode_header(slots, used, last)
        hosts[i][:len(raw)].copy_(torch.frombuffer(bytearray(raw), dtype=torch.uint8))
        with torch.cuda.stream(pack_stream):
            if cuda:
                headers[i][:len(raw)].copy_(hosts[i][:len(raw)], non_blocking=True)
                copied[i] = pack_stream.record_event()
            if push.verify:
                sums.append(checksum(buf[:used]))
            packed = pack_stream.record_event() if cuda else None
        heads[i] = transport.broadcast(headers[i], after=copied[i])
        sent[i] = transport.broadcast(buf[:used], after=packed)
        nbytes_total += sum(s.nbytes for s in slots)
        count += len(slots)
        if last:
            break
    transport.finish([h for h in heads + sent if h is not None], deadline, f"push v{push.version}", failed)
    return Sent([int(s) for s in sums], nbytes_total, k + 1, count)


def receive(push: Push, transport: Transport, load_fn: Callable[[list[tuple[str, torch.Tensor]]], Any],
            deadline: float) -> list[int]:
    """Receiver: bucket k+1 arrives while bucket k is loaded. Returns the checksums of what arrived."""
    hsize = header_bytes(push.bucket_bytes)
    headers = [torch.zeros(hsize, dtype=torch.uint8, device=transport.device) for _ in range(2)]
    buffers = _Buffers(push.bucket_bytes, transport.device)
    loaded: list[Any] = []
    sums: list[torch.Tensor] = []
    what = f"receive v{push.version}"
    header = transport.broadcast(headers[0])
    slots, nbytes, last = decode_header(transport.fetch(header, headers[0], deadline, f"{what} header 0"))
    k = 0
    data = transport.broadcast(buffers.get(0, nbytes)[:nbytes])
    while True:
        if not last:
            header = transport.broadcast(headers[(k + 1) % 2])
        transport.ready(data, deadline, f"{what} bucket {k}")
        buf = buffers.get(k, nbytes)[:nbytes]
        if push.verify:
            sums.append(checksum(buf))
        load_fn([(slot.name, view(buf, slot)) for slot in slots])
        loaded.append(transport.mark())
        if last:
            break
        slots, nbytes, last = decode_header(transport.fetch(header, headers[(k + 1) % 2], deadline,
                                                            f"{what} header {k + 1}"))
        k += 1
        # the buffer last held bucket k-2, whose load must be complete first
        data = transport.broadcast(buffers.get(k, nbytes)[:nbytes], after=loaded[k - 2] if k >= 2 else None)
    transport.finish([h for h in loaded if h is not None], deadline, f"load v{push.version}")
    return [int(s) for s in sums]
