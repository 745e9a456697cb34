"""sync.py: the bucket plan, views, checksums, rank math, rendezvous, and the gloo data path.

No Ray here: the gloo tests run the sync group in one process, each rank on its own thread with its
own TCPStore client (rank 0 owns the store), exactly as trainer and engines do across processes.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from rollfleet.runtime import sync
from rollfleet.spec import load_spec

HOST = "127.0.0.1"
CPU = torch.device("cpu")

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int8, torch.uint8, torch.int16,
          torch.int32, torch.int64, torch.bool, torch.complex64]
DTYPES += [d for d in (getattr(torch, "float8_e4m3fn", None), getattr(torch, "float8_e5m2", None)) if d]


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    if dtype.is_floating_point or dtype.is_complex:
        return torch.randn(shape, generator=g, dtype=torch.float32).to(dtype) if not dtype.is_complex else \
            torch.randn(shape, generator=g, dtype=dtype)
    info = torch.iinfo(dtype)
    return torch.randint(max(info.min, -1000), min(info.max, 1000), shape, generator=g, dtype=dtype)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bitwise equality (NaN-safe, works for every dtype including float8)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


# ---------------------------------------------------------------------------------------------
# The wire format: a header before each bucket


def _named(sizes: list[int], dtype=torch.float32) -> list[tuple[str, torch.Tensor]]:
    return [(f"p{i}", torch.zeros(n, dtype=dtype)) for i, n in enumerate(sizes)]


def test_header_round_trips_slots_size_and_last():
    slots = [sync.Slot("model.layers.0.w", "bfloat16", (3, 4), 0, 24), sync.Slot("b", "int64", (), 256, 8)]
    raw = sync.encode_header(slots, 512, last=False)
    padded = raw + bytes(100)  # the header buffer is larger than what it carries
    assert sync.decode_header(padded) == (slots, 512, False)
    assert sync.decode_header(sync.encode_header([], 0, True)) == ([], 0, True)


def test_header_size_follows_the_bucket_size_within_bounds():
    assert sync.header_bytes(1 << 20) == 16 << 10
    assert sync.header_bytes(1 << 30) == 256 << 10
    assert sync.header_bytes(16 << 20) == 64 << 10


def test_push_round_trips_through_its_wire_form():
    push = sync.Push(version=3, bucket_bytes=1 << 20, verify=True)
    assert sync.Push.from_wire(push.to_wire()) == push
    assert sync.Push.from_wire(push) is push


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_view_round_trips_every_dtype(dtype):
    tensors = [("x", _tensor(dtype, (3, 5), 1)), ("y", _tensor(dtype, (7,), 2)), ("z", _tensor(dtype, (), 3))]
    buf = torch.zeros(4096, dtype=torch.uint8)
    offset = 0
    for name, t in tensors:
        slot, _ = sync._slot(name, t, offset)
        buf[slot.offset:slot.offset + slot.nbytes].copy_(t.reshape(-1).view(torch.uint8))
        v = sync.view(buf, slot)
        assert _same(v, t)
        assert v.data_ptr() == buf.data_ptr() + slot.offset  # a view, not a copy
        offset = sync._align(offset + slot.nbytes)


# ---------------------------------------------------------------------------------------------
# Checksums


def test_checksum_detects_a_flipped_byte_anywhere():
    buf = torch.randint(0, 256, (4096,), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ref = int(sync.checksum(buf))
    assert int(sync.checksum(buf.clone())) == ref
    for pos in (0, 1, 2, 3, 2047, 4095):
        for bit in (0, 7):
            bad = buf.clone()
            bad[pos] ^= 1 << bit
            assert int(sync.checksum(bad)) != ref, (pos, bit)


def test_checksum_detects_truncation():
    buf = torch.full((1024,), 0xAB, dtype=torch.uint8)
    cut = buf.clone()
    cut[512:] = 0  # the tail never arrived
    assert int(sync.checksum(cut)) != int(sync.checksum(buf))


# ---------------------------------------------------------------------------------------------
# Rank math: trainer = 0; engine i, TP rank t = 1 + i·TP + t; world size = 1 + engines × TP


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_rank_math_matches_the_spec_world_size(tp):
    spec = load_spec({"pools": {"inference": {"nodes": 2, "gpusPerNode": 4}}, "vllm": {"tensorParallelSize": tp}})
    assert spec.engines == 8 // tp
    assert spec.world_size == 1 + spec.engines * tp == 9
    ranks = [sync.rank_of(i, t, tp) for i in range(spec.engines) for t in range(tp)]
    assert ranks == list(range(1, spec.world_size))  # every worker rank once, none is the trainer's
    for i in range(spec.engines):
        for t in range(tp):
            assert sync.describe_rank(sync.rank_of(i, t, tp), tp) == \
                f"rank {1 + i * tp + t} (engine {i}, TP rank {t})"
    assert sync.describe_rank(0, tp) == "rank 0 (trainer)"


def test_describe_rank_examples():
    assert sync.describe_rank(2, 1) == "rank 2 (engine 1, TP rank 0)"
    assert sync.describe_rank(4, 2) == "rank 4 (engine 1, TP rank 1)"
    assert sync.describe_rank(8, 4) == "rank 8 (engine 1, TP rank 3)"
    assert sync.describe_rank(9, 4) == "rank 9 (engine 2, TP rank 0)"


# ---------------------------------------------------------------------------------------------
# Rendezvous and deadlines


def test_wait_joined_returns_once_every_rank_announced():
    store, port = sync.open_store(HOST, 3, 5)
    assert port > 0

    def late(rank):
        time.sleep(0.2)
        sync.announce(sync.connect_store(HOST, port, 3, 5), rank)

    threads = [threading.Thread(target=late, args=(r,)) for r in (1, 2)]
    for t in threads:
        t.start()
    sync.wait_joined(store, 3, 1, timeout_s=5)
    for t in threads:
        t.join()
    assert store.check([sync.JOIN_KEY.format(1), sync.JOIN_KEY.format(2)])


def test_wait_joined_names_the_rank_that_never_joined_within_the_timeout():
    store, port = sync.open_store(HOST, 3, 5)
    sync.announce(sync.connect_store(HOST, port, 3, 5), 1)
    t0 = time.monotonic()
    with pytest.raises(sync.SyncError) as err:
        sync.wait_joined(store, 3, 1, timeout_s=1)
    elapsed = time.monotonic() - t0
    assert 1 <= elapsed < 3
    msg = str(err.value)
    assert "rank 2 (engine 1, TP rank 0)" in msg and "rank 1 " not in msg
    assert "sync.timeoutSeconds" in msg


def test_wait_joined_with_tp_names_only_the_missing_worker():
    store, port = sync.open_store(HOST, 5, 5)  # 2 engines × TP 2
    client = sync.connect_store(HOST, port, 5, 5)
    for r in (1, 2, 4):
        sync.announce(client, r)
    with pytest.raises(sync.SyncError) as err:
        sync.wait_joined(store, 5, 2, timeout_s=1)
    msg = str(err.value)
    assert "rank 3 (engine 1, TP rank 0)" in msg
    assert "rank 4" not in msg and "rank 2 " not in msg


def test_wait_joined_stops_early_when_an_engine_already_failed():
    store, _ = sync.open_store(HOST, 3, 5)
    t0 = time.monotonic()
    with pytest.raises(sync.SyncError, match="engine 1: EngineStartError: boom"):
        sync.wait_joined(store, 3, 1, timeout_s=30, failed=lambda: "engine 1: EngineStartError: boom")
    assert time.monotonic() - t0 < 5  # did not wait for the 30 s timeout


def test_with_deadline_raises_on_a_hang():
    release = threading.Event()
    t0 = time.monotonic()
    with pytest.raises(sync.SyncError, match="gloo init did not finish within sync.timeoutSeconds=0.5"):
        sync.with_deadline(lambda: release.wait(30), 0.5, "gloo init")
    assert time.monotonic() - t0 < 5
    release.set()


def test_with_deadline_returns_the_value_and_reraises_errors():
    assert sync.with_deadline(lambda: 42, 5, "x") == 42

    def boom():
        raise KeyError("inner")

    with pytest.raises(KeyError, match="inner"):
        sync.with_deadline(boom, 5, "x")


def test_join_times_out_when_rank_0_never_builds_its_transport():
    store, port = sync.open_store(HOST, 2, 5)
    t0 = time.monotonic()
    with pytest.raises(sync.SyncError, match="sync group join of rank 1"):
        sync.join("gloo", HOST, port, 1, 2, CPU, timeout_s=1)
    assert time.monotonic() - t0 < 5
    assert store.check([sync.JOIN_KEY.format(1)])  # it did announce itself first


# ---------------------------------------------------------------------------------------------
# The gloo data path: rank 0 sends, two receivers on threads


def _group(world: int, timeout_s: float = 10):
    """Rank 0's transport and the receivers' transports (each with its own TCPStore client)."""
    store, port = sync.open_store(HOST, world, timeout_s)
    receivers: dict[int, sync.Transport] = {}
    errors: list[BaseException] = []

    def joiner(rank):
        try:
            receivers[rank] = sync.join("gloo", HOST, port, rank, world, CPU, timeout_s)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=joiner, args=(r,)) for r in range(1, world)]
    for t in threads:
        t.start()
    sync.wait_joined(store, world, 1, timeout_s)
    sender = sync.with_deadline(lambda: sync.make_transport("gloo", store, 0, world, CPU, timeout_s),
                                timeout_s, "rank 0 init")
    for t in threads:
        t.join(timeout_s)
    assert not errors, errors
    return store, sender, [receivers[r] for r in range(1, world)]


def _push(push, tensors, sender, receivers, timeout_s: float = 20):
    """One push: returns (what rank 0 sent, per receiver: (checksums, [(name, copy) loaded], buffers seen,
    slots per bucket))."""
    results: dict[int, tuple] = {}
    errors: list[BaseException] = []

    def receive(i, transport):
        loaded: list[tuple[str, torch.Tensor]] = []
        buffers: set[int] = set()
        buckets: list[list[str]] = []

        def load(weights):
            buckets.append([n for n, _ in weights])
            for name, t in weights:
                buffers.add(t.untyped_storage().data_ptr())
                loaded.append((name, t.clone()))

        try:
            sums = sync.receive(push, transport, load, time.monotonic() + timeout_s)
            results[i] = (sums, loaded, buffers, buckets)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=receive, args=(i, t)) for i, t in enumerate(receivers)]
    for t in threads:
        t.start()
    sent = sync.send(push, iter(tensors), sender, time.monotonic() + timeout_s)
    for t in threads:
        t.join(timeout_s)
    assert not errors, errors
    return sent, [results[i] for i in range(len(receivers))]


@pytest.fixture(scope="module")
def group3():
    """Trainer rank 0 + 2 receivers, kept for the module (a gloo group is reusable across pushes)."""
    store, sender, receivers = _group(3)
    yield sender, receivers
    del store


def _weights(seed: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(9):
        out.append((f"layer{i}.weight", torch.randn(40 + 13 * i, 17, generator=g)))
        out.append((f"layer{i}.bias", torch.randn(17, generator=g).to(torch.bfloat16)))
    out.append(("big", torch.randn(6000, generator=g)))  # 24000 bytes: larger than a 12 KiB bucket
    out.append(("steps", torch.arange(5, dtype=torch.int64)))
    out.append(("transposed", torch.randn(6, 11, generator=g).t()))  # non-contiguous source
    return out


def test_gloo_push_delivers_equal_tensors_to_every_receiver(group3):
    sender, receivers = group3
    tensors = _weights(0)
    sent, results = _push(sync.Push(1, 12 << 10, verify=True), tensors, sender, receivers)
    assert sent.buckets >= 3 and sent.tensors == len(tensors)  # both buffers get reused
    assert sent.bytes == sum(t.numel() * t.element_size() for _, t in tensors)
    for sums, loaded, buffers, buckets in results:
        assert sums == sent.checksums and len(sums) == sent.buckets  # equal on every receiver
        assert [n for n, _ in loaded] == [n for n, _ in tensors]  # order kept, nothing dropped or repeated
        for (name, want), (_, got) in zip(tensors, loaded):
            assert _same(got, want.contiguous()), name
        assert ["big"] in buckets  # larger than a bucket: one of its own
        assert len(buffers) <= 3  # two receive buffers reused for every bucket, one of them grown for "big"


def test_buckets_pack_greedily_in_order(group3):
    sender, receivers = group3
    tensors = _named([10, 100, 7, 300, 1, 64])  # float32: 40, 400, 28, 1200, 4, 256 bytes
    _, results = _push(sync.Push(2, 1024, verify=True), tensors, sender, receivers)
    # 40 → 256, +400 → 768, +28 fits exactly (768 + 28 <= 1024), then 1200 alone, then 4 + 256
    assert results[0][3] == [["p0", "p1", "p2"], ["p3"], ["p4", "p5"]]


def test_a_bucket_closes_when_its_header_is_full(group3):
    sender, receivers = group3
    names = [(f"model.layers.{i}.{'x' * 200}", torch.zeros(1)) for i in range(200)]  # ~220 bytes of header each
    sent, results = _push(sync.Push(3, 1 << 20, verify=False), names, sender, receivers)
    per_bucket = [len(b) for b in results[0][3]]
    assert sum(per_bucket) == 200 and sent.buckets == len(per_bucket) > 1
    assert max(per_bucket) * 220 <= sync.header_bytes(1 << 20)


def test_a_weight_name_too_long_for_any_header_is_an_error_naming_it(group3):
    sender, _ = group3
    with pytest.raises(sync.SyncError, match="raise sync.bucketMiB"):
        sync.send(sync.Push(4, 1 << 20, False), [("n" * 20000, torch.zeros(1))], sender, time.monotonic() + 5)


def test_an_empty_push_is_one_empty_last_bucket(group3):
    sender, receivers = group3
    sent, results = _push(sync.Push(5, 4096, verify=True), [], sender, receivers)
    assert sent.buckets == 1 and sent.tensors == 0 and sent.bytes == 0
    assert all(r[1] == [] for r in results)


def test_gloo_pushes_reuse_the_group_and_checksums_track_content(group3):
    sender, receivers = group3
    first = _weights(1)
    second = [(n, t + 1 if t.dtype.is_floating_point else t) for n, t in first]
    sums = []
    for version, tensors in ((6, first), (7, second)):
        sent, results = _push(sync.Push(version, 4096, verify=True), tensors, sender, receivers)
        for r_sums, loaded, _, _ in results:
            assert r_sums == sent.checksums
            assert all(_same(got, want.contiguous()) for (_, want), (_, got) in zip(tensors, loaded))
        sums.append(sent.checksums)
    assert sums[0] != sums[1]


def test_gloo_push_without_checksums_still_delivers(group3):
    sender, receivers = group3
    tensors = _weights(2)
    sent, results = _push(sync.Push(8, 1 << 20, verify=False), tensors, sender, receivers)
    assert sent.checksums == [] and sent.buckets == 1
    for sums, loaded, _, _ in results:
        assert sums == []
        assert all(_same(got, want.contiguous()) for (_, want), (_, got) in zip(tensors, loaded))


def test_gloo_receive_raises_within_its_deadline_when_nothing_arrives():
    # (a short group timeout: dropping a gloo group with a pending op waits for that timeout)
    store, sender, (receiver,) = _group(2, timeout_s=4)
    t0 = time.monotonic()
    with pytest.raises(sync.SyncError, match="receive v1 header 0"):
        sync.receive(sync.Push(1, 4096, True), receiver, lambda w: None, time.monotonic() + 1)
    assert time.monotonic() - t0 < 3  # the 1 s deadline, not the group's 4 s timeout
    # the group is now broken by design (a pending receive): dropped, never reused


def test_gloo_send_raises_within_its_deadline_when_a_receiver_never_takes_part():
    store, sender, (receiver,) = _group(2, timeout_s=4)
    tensors = [(f"w{i}", torch.randn(1 << 18)) for i in range(6)]
    t0 = time.monotonic()
    with pytest.raises(sync.SyncError, match="push v7"):
        sync.send(sync.Push(7, 1 << 20, True), tensors, sender, time.monotonic() + 1)
    assert time.monotonic() - t0 < 3  # the 1 s deadline, not the group's 4 s timeout


# ---------------------------------------------------------------------------------------------
# Rank 0's extra memory during a streamed push, read from the C allocator (glibc's mallinfo2:
# torch's CPU tensors are plain malloc'd memory, so this sees every buffer and every tensor)

RECEIVER = """
import os, sys, time, torch
from rollfleet.runtime import sync
host, port, version, bucket = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
transport = sync.join("gloo", host, port, 1, 2, torch.device("cpu"), 30)
got = {}
sync.receive(sync.Push(version, bucket, True), transport, lambda w: got.update((n, float(t.double().sum())) for n, t in w),
             time.monotonic() + 60)
print(len(got), sum(got.values()), flush=True)
os._exit(0)  # skip gloo's teardown at interpreter exit
"""


def _malloc_in_use() -> int:
    import ctypes

    class Mallinfo2(ctypes.Structure):
        _fields_ = [(name, ctypes.c_size_t) for name in
                    ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                     "keepcost")]

    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = Mallinfo2
    info = libc.mallinfo2()
    return info.uordblks + info.hblkhd  # in use: heap chunks + mmapped chunks


def test_streamed_push_holds_at_most_two_buckets_and_the_largest_tensor():
    import subprocess
    import sys

    try:
        _malloc_in_use()
    except (OSError, AttributeError):
        pytest.skip("needs glibc's mallinfo2 to read the C allocator")
    bucket, largest = 1 << 20, 512 << 10
    sizes = [largest // 4 * (1 + i % 4) for i in range(64)]  # 128..512 KiB each, 20 MiB in all
    store, port = sync.open_store(HOST, 2, 30)
    proc = subprocess.Popen([sys.executable, "-c", RECEIVER, HOST, str(port), "1", str(bucket)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        sync.wait_joined(store, 2, 1, 30)
        sender = sync.with_deadline(lambda: sync.make_transport("gloo", store, 0, 2, CPU, 30), 30, "rank 0")
        samples: list[int] = []

        def gathered():  # like a sharded model: each tensor exists only once it is pulled
            g = torch.Generator().manual_seed(0)
            for i, nbytes in enumerate(sizes):
                samples.append(_malloc_in_use())
                t = torch.randn(nbytes // 4, generator=g)
                samples.append(_malloc_in_use())
                yield f"w{i}", t
            samples.append(_malloc_in_use())

        baseline = _malloc_in_use()
        sent = sync.send(sync.Push(1, bucket, True), gathered(), sender, time.monotonic() + 60)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 0, err[-2000:]
    assert int(out.split()[0]) == len(sizes) and sent.tensors == len(sizes) and sent.buckets >= 10
    peak = max(samples) - baseline
    bound = 2 * bucket + largest + 2 * sync.header_bytes(bucket)
    slack = 512 << 10  # fixed: Python objects, Work handles, malloc bookkeeping (not proportional to the model)
    assert peak <= bound + slack, f"peak extra {peak} bytes > 2 buckets + largest tensor = {bound} (+{slack})"
    assert peak >= 2 * bucket  # the measurement sees the two buffers (it is not blind)
    assert sum(sizes) > 4 * (bound + slack)  # holding the model would have been far over the bound
