"""ipc.py without Ray: the CPU stand-in for CUDA IPC (torch shared memory, file_system strategy) really
shares memory across processes, and the worker side of a call (`load`) builds the tensors or bucket
views, loads them and checksums what it read. IpcSender against engines: test_colocated.py."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

from rollfleet.runtime import ipc, sync

CHILD = """
import base64, pickle, sys, torch
import torch.multiprocessing as mp
mp.set_sharing_strategy("file_system")
t = pickle.loads(base64.b64decode(sys.stdin.read()))
print(float(t.sum()), flush=True)
t.fill_(7.0)  # written through the shared memory: the parent sees it
print("done", flush=True)
"""


@pytest.fixture(autouse=True)
def file_system_strategy():
    old = mp.get_sharing_strategy()
    mp.set_sharing_strategy("file_system")
    yield
    mp.set_sharing_strategy(old)


def test_a_shared_cpu_tensor_is_the_same_memory_in_another_process():
    import base64

    t = torch.arange(6, dtype=torch.float32).share_memory_()
    handle = ipc.share(t)
    assert handle["cuda"] is False and len(handle["payload"]) < 1000  # a name, not the bytes
    proc = subprocess.run([sys.executable, "-c", CHILD], input=base64.b64encode(handle["payload"]).decode(),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split()[:2] == ["15.0", "done"]
    assert torch.equal(t, torch.full((6,), 7.0))


def test_a_cpu_tensor_outside_shared_memory_is_refused():
    with pytest.raises(ValueError, match="shared memory"):
        ipc.share(torch.zeros(3))


def test_direct_load_opens_each_handle_once_and_loads_the_tensors_themselves():
    a, b = torch.randn(3, 4).share_memory_(), torch.randn(5).share_memory_()
    cache: dict = {}
    loaded: list = []
    msg = {"version": 1, "verify": True, "buffer": None, "handles": {"a@1": ipc.share(a), "b@1": ipc.share(b)},
           "tensors": [("x.weight", "a@1"), ("x.bias", "b@1")]}
    out = ipc.load(msg, cache, loaded.extend)
    assert [n for n, _ in loaded] == ["x.weight", "x.bias"] and set(cache) == {"a@1", "b@1"}
    assert out["checksums"] == [ipc.checksum(a), ipc.checksum(b)]
    a.add_(1.0)  # the trainer's next optimizer step, in place
    loaded.clear()
    again = ipc.load({**msg, "handles": {}, "version": 2}, cache, loaded.extend)  # no handle the second time
    assert torch.equal(loaded[0][1], a) and again["checksums"][0] == ipc.checksum(a) != out["checksums"][0]


def test_staged_load_hands_views_of_the_bucket_to_load_weights():
    buf = torch.zeros(4096, dtype=torch.uint8).share_memory_()
    tensors = [("w", torch.randn(4, 4)), ("b", torch.randn(3).to(torch.bfloat16))]
    slots, used = [], 0
    for name, t in tensors:
        slot, _ = sync._slot(name, t, used)
        buf[used:used + slot.nbytes].copy_(t.reshape(-1).view(torch.uint8))
        slots.append(slot)
        used = sync._align(used + slot.nbytes)
    cache: dict = {}
    loaded: list = []
    msg = {"version": 1, "verify": True, "handles": {"bucket-0": ipc.share(buf)}, "buffer": "bucket-0",
           "slots": [tuple(vars(s).values()) for s in slots]}
    out = ipc.load(msg, cache, loaded.extend)
    assert [n for n, _ in loaded] == ["w", "b"]
    for (_, want), (_, got) in zip(tensors, loaded):
        assert got.dtype == want.dtype and torch.equal(got, want)
        assert got.untyped_storage().data_ptr() == cache["bucket-0"].untyped_storage().data_ptr()  # a view
    assert out["checksums"] == [ipc.checksum(t) for _, t in tensors]


def test_a_checksum_sees_every_byte():
    t = torch.zeros(10, dtype=torch.bfloat16)
    before = ipc.checksum(t)
    t[9] = 1.0
    assert ipc.checksum(t) != before
