"""Engines that come back (supervisor.py, sender.py, rollout.py) on a real local Ray: 2 CPU stand-in
engines over gloo, this process as trainer rank 0. A real SIGKILL or SIGSTOP of an engine's process
with rollouts in flight, mid-push, while it starts and during the rendezvous, one after another on one fleet; a spent
budget. Each time: the run goes on, every request ends exactly once, the replaced engine serves
the current weights (its greedy tokens regenerated from the version they are stamped with), and no
process of the old incarnation is left. One fleet for the module: each test leaves it healthy."""

from __future__ import annotations

import os
import signal
import threading
import time

import psutil
import pytest

from rollfleet import demo
from rollfleet.runtime import sync, tiny
from rollfleet.runtime.fleet import Fleet
from rollfleet.runtime.rollout import Request, RolloutError
from rollfleet.runtime.supervisor import FleetFailed

from reference import Reference, weights

pytestmark = pytest.mark.slow

FAST = ["recovery.probeSeconds=1", "recovery.probeTimeoutSeconds=2", "sync.timeoutSeconds=10",
        "timeouts.healthSeconds=40", "timeouts.initSeconds=90", "recovery.maxRestarts=20"]  # one fleet, many faults
LONG = {"max_tokens": 120, "ignore_eos": True, "temperature": 1.0}
GREEDY = {"temperature": 0.0, "max_tokens": 10, "ignore_eos": True}


@pytest.fixture(scope="module")
def ray_local():
    spec = demo.local_spec([*FAST, "pools.inference.gpusPerNode=4"])  # room for a second fleet beside the module's
    ray = demo.start_local_ray(spec, extra_cpus=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def fleet(ray_local):
    fleet = Fleet.start(demo.local_spec(FAST), str(tiny.ensure()))
    yield fleet
    fleet.shutdown()


def pid_of(fleet: Fleet, engine: int) -> int:
    return fleet.health()[engine]["pid"]


def wait_state(fleet: Fleet, engine: int, states: tuple[str, ...], timeout_s: float = 60) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        roster = fleet.roster()
        if roster["engines"][engine]["state"] in states:
            return roster
        time.sleep(0.1)
    raise AssertionError(f"engine {engine} never {states}: {fleet.roster()}")


def gone(pid: int, timeout_s: float = 20) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return True
        time.sleep(0.1)
    return False


def serves_current_weights(fleet: Fleet, sender, reference: Reference, engine: int) -> None:
    """Greedy tokens of `engine` alone are stamped with the fleet's version and are what that
    version's weights give."""
    with fleet.rollouts([engine]) as client:
        (c,) = client.generate([Request(prompt="One two three four", params=GREEDY)])
    assert c.engine == engine and c.samples[0].versions == ((0, sender.version),)
    assert reference.mismatches(c, GREEDY) == []


def heal(fleet: Fleet, sender) -> None:
    """Leave the fleet healthy for the next test: every engine back and synced to a new version."""
    fleet.settle(90)
    sender.push(weights(sender.version + 1).items())
    assert {e["state"] for e in fleet.roster()["engines"]} == {"healthy"}


def take_all(client, ids: list[str]) -> list[str]:
    got = [c.request_id for c in client.results(60)]
    assert sorted(got) == sorted(ids), "a request was lost or delivered twice"
    return got


@pytest.fixture(scope="module")
def sender(fleet):
    s = fleet.sender("cpu")
    s.push(weights(1).items())
    return s


# ---- rollouts in flight ----------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_an_engine_that_dies_or_freezes_with_rollouts_in_flight_is_replaced_and_loses_nothing(
        fleet, sender, reference, fault):
    pid = pid_of(fleet, 1)
    with fleet.rollouts() as client:
        ids = client.submit([Request(prompt=f"p{i} the cat", params={**LONG, "seed": i}) for i in range(6)])
        time.sleep(0.5)
        t_kill = time.time()
        os.kill(pid, getattr(signal, fault))
        got = take_all(client, ids)
        assert client.stats["resent"] >= 1 and client.stats["failed"] == 0
    dead = next(e for e in fleet.events() if e["engine"] == 1 and e["state"] == "dead" and e["t"] > t_kill)
    detect = dead["t"] - t_kill
    assert ("frozen" in dead["what"]) == (fault == "SIGSTOP"), dead
    assert detect < (2 * 2 + 1 + 2 if fault == "SIGSTOP" else 3)  # two probe timeouts (+ one interval), or at once
    assert gone(pid), "the old incarnation's process is still there"
    roster = wait_state(fleet, 1, ("stale",))  # loaded, but not serving before a push reaches it
    assert roster["engines"][1]["version"] == 0 and len(got) == 6
    sender.push(weights(sender.version + 1).items())
    serves_current_weights(fleet, sender, reference, 1)


# ---- mid-push ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", ["SIGKILL", "SIGSTOP"])
def test_a_fault_mid_push_fails_it_naming_the_engine_and_the_next_push_reaches_every_engine(
        fleet, sender, reference, fault):
    pid = pid_of(fleet, 1)
    new = list(weights(sender.version + 1).items())
    with fleet.rollouts() as client:
        ids = client.submit([Request(prompt=f"q{i}", params={**LONG, "max_tokens": 30}) for i in range(4)])

        def items():  # the push pulls lazily: engine 1's process ends after 20 tensors
            for i, item in enumerate(new * 3):
                if i == 20:
                    os.kill(pid, getattr(signal, fault))
                yield item

        t0 = time.monotonic()
        with pytest.raises(sync.SyncError) as err:
            sender.push(items())
        assert time.monotonic() - t0 < 10 + 15  # sync.timeoutSeconds plus the probes that name the engine
        msg = str(err.value)
        assert "engine 1" in msg and "engine 0 stopped" not in msg and "engine 0 died" not in msg, msg
        deadline = time.monotonic() + 5  # its receive notices within a slice that rank 0 gave the push up
        while (survivor := fleet.health()[0])["state"] == "receiving" and time.monotonic() < deadline:
            time.sleep(0.1)
        # the old version, never half a model: stale (serving nothing) until a push reaches it
        assert survivor["weight_version"] == sender.version and survivor["state"] == "stale", survivor
        fleet.settle(90)
        stats = sender.push(new, version=sender.version + 1)  # the same weights again, once the fleet settled
        assert stats.engines == 2 and stats.checksums_ok
        take_all(client, ids)  # the requests waited for the new weights, on the survivor or the replacement
    assert gone(pid)
    serves_current_weights(fleet, sender, reference, 1)
    serves_current_weights(fleet, sender, reference, 0)


# ---- start and rendezvous -----------------------------------------------------------------------


def test_an_engine_killed_during_the_rendezvous_is_waited_for_and_the_group_forms(fleet, sender, reference):
    pid = pid_of(fleet, 0)
    box: dict = {}
    t = threading.Thread(target=lambda: box.update(sender=fleet.sender("cpu")))
    t.start()
    os.kill(pid, signal.SIGKILL)
    t.join(120)
    again = box["sender"]
    assert [i for i, _ in again.members] == [0, 1]
    again.push(weights(again.version + 1).items())
    serves_current_weights(fleet, again, reference, 0)
    heal(fleet, sender)  # the module's sender forms its group again, and continues the fleet's versions


# ---- a start that dies, a spent budget ----------------------------------------------------------


def test_an_engine_killed_while_it_starts_is_started_again_and_a_spent_budget_stops_the_run(ray_local):
    """A fleet of its own (1 engine, recovery.maxRestarts=1): killed while it loads its model, it is
    started again and serves; killed once more, its budget is spent and the run stops in one line."""
    box: dict = {}
    one = demo.local_spec([*FAST, "pools.inference.gpusPerNode=1", "recovery.maxRestarts=1"])
    t = threading.Thread(target=lambda: box.update(fleet=Fleet.start(one, str(tiny.ensure()))))
    before = {p.pid for p in psutil.process_iter(["cmdline"]) if "EngineActor" in " ".join(p.info["cmdline"] or [])}
    t.start()
    victim = None
    deadline = time.monotonic() + 30
    while victim is None and time.monotonic() < deadline:  # an engine process of the new fleet, loading its model
        for p in psutil.process_iter(["cmdline"]):
            if "EngineActor" in " ".join(p.info["cmdline"] or []) and p.pid not in before:
                victim = p.pid
        time.sleep(0.05)
    time.sleep(1.0)
    os.kill(victim, signal.SIGKILL)
    t.join(120)
    fleet = box["fleet"]
    try:
        assert any(e["state"] == "dead" for e in fleet.events()), fleet.events()
        assert {e["state"] for e in fleet.roster()["engines"]} == {"healthy"}
        assert gone(victim)
        with fleet.rollouts() as client:
            take_all(client, client.submit([Request(prompt=f"s{i}", params=GREEDY) for i in range(4)]))

        pid = pid_of(fleet, 0)
        with fleet.rollouts() as client:
            client.submit([Request(prompt=f"b{i}", params=LONG) for i in range(4)])
            os.kill(pid, signal.SIGKILL)
            t0 = time.monotonic()
            with pytest.raises(RolloutError) as err:  # the run stops: what waits raises, and so does any new request
                list(client.results(30))
                wait_state(fleet, 0, ("failed",), 10)
                client.submit([Request(prompt="more", params=LONG)])
            assert time.monotonic() - t0 < 15
        msg = str(err.value)
        assert "the fleet failed: engine 0 failed 2 times" in msg and "recovery.maxRestarts=1 is spent" in msg
        assert "0 engine(s) are left (recovery.minEngines=1)" in msg and "\n" not in msg
        with pytest.raises(FleetFailed, match="engine 0 failed 2 times"):
            fleet.sender("cpu")  # and so is the next push
        assert fleet.health()[0]["state"] == "dead" and gone(pid)  # health reports it, never raises
    finally:
        fleet.shutdown()
