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
# The bucket plan


def _named(sizes: list[int], dtype=torch.float32) -> list[tuple[str, torch.Tensor]]:
    return [(f"p{i}", torch.zeros(n, dtype=dtype)) for i, n in enumerate(sizes)]


def test_plan_packs_greedily_in_order_and_aligns_every_slot():
    tensors = _named([10, 100, 7, 300, 1, 64])  # float32: 40, 400, 28, 1200, 4, 256 bytes
    plan = sync.plan_buckets(tensors, 1024, version=3, verify=True)
    assert plan.version == 3 and plan.verify is True
    names = [s.name for b in plan.buckets for s in b.slots]
    assert names == [n for n, _ in tensors]  # parameter order kept, nothing dropped or repeated
    # 40 → 256, +400 → 768, +28 → 1024 (fits exactly: 768 + 28 <= 1024), then 1200 alone, then 4 + 256
    assert [[s.name for s in b.slots] for b in plan.buckets] == [["p0", "p1", "p2"], ["p3"], ["p4", "p5"]]
    for b in plan.buckets:
        for s in b.slots:
            assert s.offset % sync.ALIGN == 0
            assert s.offset + s.nbytes <= b.nbytes
        assert b.nbytes % sync.ALIGN == 0  # so a bucket views as int32 for its checksum
        ends = [s.offset + s.nbytes for s in b.slots]
        assert all(e <= nxt.offset for e, nxt in zip(ends, b.slots[1:]))  # no overlap
    assert plan.buffer_bytes == max(b.nbytes for b in plan.buckets)


def test_plan_gives_an_oversized_tensor_its_own_bucket():
    tensors = _named([16, 5000, 16])  # the middle one is 20000 bytes > 4096
    plan = sync.plan_buckets(tensors, 4096, 1, False)
    assert [[s.name for s in b.slots] for b in plan.buckets] == [["p0"], ["p1"], ["p2"]]
    assert plan.buckets[1].slots[0].offset == 0
    assert plan.buffer_bytes >= 20000  # the buffers grow to the largest bucket
    # an oversized first tensor too
    plan = sync.plan_buckets(_named([5000, 16, 16]), 4096, 1, False)
    assert [[s.name for s in b.slots] for b in plan.buckets] == [["p0"], ["p1", "p2"]]


def test_plan_total_bytes_counts_payload_not_padding():
    tensors = [("a", torch.zeros(3, 5, dtype=torch.bfloat16)), ("b", torch.zeros(7, dtype=torch.float64)),
               ("c", torch.zeros((), dtype=torch.float32)), ("d", torch.zeros(0, dtype=torch.float16))]
    plan = sync.plan_buckets(tensors, 1 << 20, 1, True)
    assert plan.total_bytes == 3 * 5 * 2 + 7 * 8 + 4 + 0
    assert len(plan.buckets) == 1
    slots = {s.name: s for s in plan.buckets[0].slots}
    assert slots["a"].dtype == "bfloat16" and slots["a"].shape == (3, 5)
    assert slots["c"].shape == () and slots["d"].shape == (0,)


def test_plan_of_nothing_is_empty():
    plan = sync.plan_buckets([], 1024, 1, True)
    assert plan.buckets == () and plan.total_bytes == 0 and plan.buffer_bytes == 0


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
def test_view_round_trips_every_dtype(dtype):
    tensors = [("x", _tensor(dtype, (3, 5), 1)), ("y", _tensor(dtype, (7,), 2)), ("z", _tensor(dtype, (), 3))]
    plan = sync.plan_buckets(tensors, 1 << 20, 1, False)
    (bucket,) = plan.buckets
    buf = torch.zeros(bucket.nbytes, dtype=torch.uint8)
    for (_, t), slot in zip(tensors, bucket.slots):
        buf[slot.offset:slot.offset + slot.nbytes].copy_(t.reshape(-1).view(torch.uint8))
    for (_, t), slot in zip(tensors, bucket.slots):
        v = sync.view(buf, slot)
        assert _same(v, t)
        assert v.data_ptr() == buf.data_ptr() + slot.offset  # a view, not a copy


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


def _push(plan, tensors, sender, receivers, timeout_s: float = 20):
    """One push: returns (sender checksums, per receiver: (checksums, [(name, copy) loaded], buffers seen))."""
    results: dict[int, tuple] = {}
    errors: list[BaseException] = []

    def receive(i, transport):
        loaded: list[tuple[str, torch.Tensor]] = []
        buffers: set[int] = set()

        def load(weights):
            for name, t in weights:
                buffers.add(t.untyped_storage().data_ptr())
                loaded.append((name, t.clone()))

        try:
            sums = sync.receive(plan, transport, load, time.monotonic() + timeout_s)
            results[i] = (sums, loaded, buffers)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=receive, args=(i, t)) for i, t in enumerate(receivers)]
    for t in threads:
        t.start()
    sent = sync.send(plan, tensors, sender, time.monotonic() + timeout_s)
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
    out.append(("big", torch.randn(3000, generator=g)))  # 12000 bytes: larger than a bucket
    out.append(("steps", torch.arange(5, dtype=torch.int64)))
    out.append(("transposed", torch.randn(6, 11, generator=g).t()))  # non-contiguous source
    return out


def test_gloo_push_delivers_equal_tensors_to_every_receiver(group3):
    sender, receivers = group3
    tensors = _weights(0)
    plan = sync.plan_buckets(tensors, 4096, 1, verify=True)
    assert len(plan.buckets) >= 3  # both buffers get reused
    sent, results = _push(plan, [t for _, t in tensors], sender, receivers)
    assert len(sent) == len(plan.buckets)
    for sums, loaded, buffers in results:
        assert sums == sent  # checksums equal on every receiver
        assert [n for n, _ in loaded] == [n for n, _ in tensors]
        for (name, want), (_, got) in zip(tensors, loaded):
            assert _same(got, want.contiguous()), name
        assert len(buffers) == 2  # two receive buffers, reused across all buckets


def test_gloo_pushes_reuse_the_group_and_checksums_track_content(group3):
    sender, receivers = group3
    first = _weights(1)
    second = [(n, t + 1 if t.dtype.is_floating_point else t) for n, t in first]
    sums = []
    for version, tensors in ((2, first), (3, second)):
        plan = sync.plan_buckets(tensors, 4096, version, verify=True)
        sent, results = _push(plan, [t for _, t in tensors], sender, receivers)
        for r_sums, loaded, _ in results:
            assert r_sums == sent
            assert all(_same(got, want.contiguous()) for (_, want), (_, got) in zip(tensors, loaded))
        sums.append(sent)
    assert sums[0] != sums[1]


def test_gloo_push_without_checksums_still_delivers(group3):
    sender, receivers = group3
    tensors = _weights(2)
    plan = sync.plan_buckets(tensors, 1 << 20, 4, verify=False)
    assert len(plan.buckets) == 1
    sent, results = _push(plan, [t for _, t in tensors], sender, receivers)
    assert sent == []
    for sums, loaded, _ in results:
        assert sums == []
        assert all(_same(got, want.contiguous()) for (_, want), (_, got) in zip(tensors, loaded))


def test_gloo_receive_raises_within_its_deadline_when_nothing_arrives():
    # (a short group timeout: dropping a gloo group with a pending op waits for that timeout)
    store, sender, (receiver,) = _group(2, timeout_s=4)
    plan = sync.plan_buckets([("w", torch.zeros(100))], 4096, 1, True)
    t0 = time.monotonic()
    with pytest.raises(sync.SyncError, match="receive v1 bucket 0"):
        sync.receive(plan, receiver, lambda w: None, time.monotonic() + 1)
    assert time.monotonic() - t0 < 3  # the 1 s deadline, not the group's 4 s timeout
    # the group is now broken by design (a pending receive): dropped, never reused


def test_gloo_send_raises_within_its_deadline_when_a_receiver_never_takes_part():
    store, sender, (receiver,) = _group(2, timeout_s=4)
    tensors = [(f"w{i}", torch.randn(1 << 18)) for i in range(6)]
    plan = sync.plan_buckets(tensors, 1 << 20, 7, True)
    t0 = time.monotonic()
    with pytest.raises(sync.SyncError, match="push v7"):
        sync.send(plan, [t for _, t in tensors], sender, time.monotonic() + 1)
    assert time.monotonic() - t0 < 3  # the 1 s deadline, not the group's 4 s timeout
