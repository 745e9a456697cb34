"""Failures of a real local Ray fleet (2 CPU stand-in engines, gloo), each on a fleet of its own: an
engine that freezes mid-push is the one named (not the healthy one that timed out waiting for it), and
the broken sync group shows in health; an engine killed with requests in flight is named by the client."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch

from rollfleet import demo
from rollfleet.runtime import sync, tiny
from rollfleet.runtime.fleet import Fleet
from rollfleet.runtime.rollout import Request, RolloutError

pytestmark = pytest.mark.slow

SYNC_TIMEOUT = 6


@pytest.fixture(scope="module")
def ray_local():
    spec = demo.local_spec()
    ray = demo.start_local_ray(spec)
    yield ray
    ray.shutdown()


@pytest.fixture
def fleet(ray_local):
    spec = demo.local_spec([f"sync.timeoutSeconds={SYNC_TIMEOUT}", "timeouts.healthSeconds=20"])
    fleet = Fleet.start(spec, str(tiny.ensure()))
    yield fleet
    fleet.shutdown()


def weights() -> list[tuple[str, torch.Tensor]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny.ensure()), dtype=torch.float32)
    return [(n, p.detach().clone()) for n, p in model.named_parameters()]


def test_an_engine_frozen_mid_push_is_named_and_health_shows_the_broken_group(fleet):
    sender = fleet.sender("cpu")
    pid = fleet.health()[1]["pid"]
    frozen = []

    def items():  # the push pulls lazily: engine 1's process stops after 20 tensors
        for i, item in enumerate(weights() * 10):
            if i == 20:
                os.kill(pid, signal.SIGSTOP)
                frozen.append(pid)
            yield item

    t0 = time.monotonic()
    try:
        with pytest.raises(sync.SyncError) as err:
            sender.push(items())
        elapsed = time.monotonic() - t0
    finally:
        if frozen:
            os.kill(pid, signal.SIGCONT)
    msg = str(err.value)
    assert "engine 1 stopped responding" in msg and "engine 0 stopped" not in msg, msg
    assert "form it again" in msg
    assert elapsed < SYNC_TIMEOUT + 15  # the sync timeout, then the health probe that names the engine
    time.sleep(1)  # engine 0's own receive deadline has passed too
    h0 = fleet.health(timeout_s=10)[0]
    assert h0["state"] == "failed" and h0["sync_group"].startswith("broken") and "form it again" in h0["last_error"]
    with pytest.raises(sync.SyncError, match="broken since push v1"):
        sender.push(weights())


def test_an_engine_killed_with_requests_in_flight_is_named_by_the_client(fleet):
    import ray

    with fleet.rollouts() as rollouts:
        rollouts.submit([Request(prompt=f"p{i}", params={"max_tokens": 250, "ignore_eos": True}) for i in range(4)])
        time.sleep(0.5)
        ray.kill(fleet.engines[1])
        t0 = time.monotonic()
        with pytest.raises(RolloutError, match=r"engine 1 failed with 2 sample\(s\) of this client in flight"):
            rollouts.take(4)
        assert time.monotonic() - t0 < 20
