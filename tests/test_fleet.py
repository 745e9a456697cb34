"""fleet.py on a real local Ray: 2 CPU stand-in engines, the sync group over gloo, rank 0 = this process.

One local Ray and one Fleet for the whole module (engine start dominates the cost). The tests share
it in file order; the destructive one (an engine killed mid-push) is the last test of the module.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from rollfleet.runtime import demo, sync, tiny
from rollfleet.runtime.fleet import Fleet, PushStats

pytestmark = pytest.mark.slow

SYNC_TIMEOUT = 10
OVERRIDES = [f"sync.timeoutSeconds={SYNC_TIMEOUT}", "timeouts.healthSeconds=30", "timeouts.initSeconds=120"]
PROMPTS = ["The answer to the question is", "hello world, the model says", "One two three four",
           "What is the color of the tree?", "red green blue", "one two"]
GREEDY = {"temperature": 0.0, "max_tokens": 12}


@pytest.fixture(scope="module")
def spec():
    return demo.local_spec(OVERRIDES)


@pytest.fixture(scope="module")
def ray_local(spec):
    ray = demo.start_local_ray(spec)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def fleet(ray_local, spec):
    fleet = Fleet.start(spec, str(tiny.ensure()))
    yield fleet
    fleet.shutdown()


@pytest.fixture(scope="module")
def sender(fleet):
    return fleet.sender("cpu")  # this test process is trainer rank 0


@pytest.fixture(scope="module")
def original() -> dict[str, torch.Tensor]:
    """The trainer's copy of the weights the engines start from (HF-named, unsharded)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny.ensure()), dtype=torch.float32)
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def perturbed(weights: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {n: t + 0.3 * torch.randn(t.shape, generator=g) for n, t in weights.items()}


def sums(weights: dict[str, torch.Tensor]) -> dict[str, float]:
    return {n: float(t.double().sum()) for n, t in weights.items()}


def engine_sums(fleet: Fleet, names: list[str]) -> list[dict[str, float]]:
    per_engine = fleet.param_sums(names)
    assert [len(tp) for tp in per_engine] == [1] * len(fleet.engines)  # the stand-in has TP 1
    return [tp[0] for tp in per_engine]


def greedy_ids(fleet: Fleet) -> list[list[int]]:
    return [o.token_ids for o in fleet.generate(PROMPTS, GREEDY)]


def test_fleet_starts_one_engine_per_inference_slot(fleet, spec):
    assert spec.engines == 2 and len(fleet.engines) == 2 and len(fleet.groups) == 2
    health = fleet.health()
    assert [h["engine"] for h in health] == [0, 1]
    assert all(h["state"] == "idle" and h["last_error"] is None for h in health)


def test_generate_spreads_prompts_over_engines_and_stamps_version_0(fleet):
    outs = fleet.generate(PROMPTS, {"n": 2, "temperature": 1.0, "max_tokens": 5, "seed": 1})
    assert len(outs) == 2 * len(PROMPTS)
    assert sorted((o.prompt_index, o.sample_index) for o in outs) == \
        [(p, s) for p in range(len(PROMPTS)) for s in range(2)]
    # contiguous chunks: the first half of the prompts on engine 0, the rest on engine 1
    assert {o.prompt_index: o.engine for o in outs} == {i: 0 if i < 3 else 1 for i in range(len(PROMPTS))}
    assert all(o.weight_version == 0 for o in outs)
    assert all(len(o.token_ids) == 5 for o in outs)


def test_generate_with_an_unknown_param_names_the_engine(fleet):
    with pytest.raises(sync.SyncError, match=r"generate: engine [01] failed: ValueError: .*top_k"):
        fleet.generate(PROMPTS, {"top_k": 3})


def test_push_makes_every_engine_param_equal_the_trainers(fleet, sender, original):
    names = list(original)
    before = engine_sums(fleet, names)
    assert all(s == pytest.approx(sums(original), rel=1e-9, abs=1e-9) for s in before)
    new = perturbed(original, 1)
    want = sums(new)
    assert want != pytest.approx(sums(original), rel=1e-6)
    version = sender.version
    stats = sender.push(new.items())
    assert isinstance(stats, PushStats)
    assert stats.version == version + 1 and stats.engines == 2
    assert stats.buckets == len(sync.plan_buckets(new.items(), fleet.spec.sync.bucket_mib << 20, 0, True).buckets)
    assert stats.checksums_ok is True
    assert stats.bytes == sum(t.numel() * t.element_size() for t in new.values())
    for got in engine_sums(fleet, names):  # every param, on every engine
        assert set(got) == set(names)
        assert got == pytest.approx(want, rel=1e-9, abs=1e-9)


def test_versions_are_stamped_on_outputs_and_health_after_a_push(fleet, sender, original):
    stats = sender.push(perturbed(original, 2).items())
    outs = fleet.generate(PROMPTS, GREEDY)
    assert {o.weight_version for o in outs} == {stats.version}
    assert {o.engine for o in outs} == {0, 1}
    assert [h["weight_version"] for h in fleet.health()] == [stats.version, stats.version]


def test_outputs_change_after_a_push_and_return_with_the_old_weights(fleet, sender, original):
    sender.push(original.items())
    base = greedy_ids(fleet)
    assert greedy_ids(fleet) == base  # greedy is deterministic (and memoized by the prefix cache)
    sender.push(perturbed(original, 3).items())
    changed = greedy_ids(fleet)
    assert changed != base  # the prefix cache was reset: no stale outputs from the old weights
    stats = sender.push(original.items())
    assert stats.checksums_ok is True
    assert greedy_ids(fleet) == base  # the same weights give the same outputs again


def test_health_answers_while_a_long_generate_is_in_flight(fleet):
    box: dict = {}

    def long_generate():
        try:
            box["outs"] = fleet.generate(PROMPTS * 4, {"n": 2, "temperature": 1.0, "max_tokens": 300, "seed": 5},
                                         timeout_s=120)
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=long_generate)
    t.start()
    seen: set[int] = set()
    deadline = time.monotonic() + 60
    while len(seen) < 2 and t.is_alive() and time.monotonic() < deadline:
        for h in fleet.health():  # would time out if health queued behind generate
            if h["state"] == "generating":
                seen.add(h["engine"])
        time.sleep(0.02)
    t.join(120)
    assert "error" not in box, box.get("error")
    assert seen == {0, 1}, "health never reported a generate in flight"
    assert len(box["outs"]) == 2 * 4 * len(PROMPTS)
    assert all(len(o.token_ids) == 300 for o in box["outs"])


# ---- destructive: leaves the sync group broken, so it runs last ------------------------------


def test_an_engine_killed_mid_push_is_named_within_the_sync_timeout(fleet, sender, original):
    import ray

    # A long push: the same weights listed many times (~300 MB, hundreds of 1 MiB buckets), so the kill
    # lands while buckets are still on the wire.
    once = list(perturbed(original, 4).items())
    items = once * max(1, 300_000_000 // sum(t.numel() * t.element_size() for _, t in once))
    box: dict = {}

    def push():
        box["t0"] = time.monotonic()
        try:
            box["stats"] = sender.push(items)
        except BaseException as exc:
            box["error"] = exc
        box["t1"] = time.monotonic()

    t = threading.Thread(target=push)
    t.start()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:  # health answers during the push
        if fleet.health()[1]["state"] == "receiving":
            break
        time.sleep(0.005)
    else:
        pytest.fail("engine 1 never reported receiving")
    ray.kill(fleet.engines[1])
    t.join(SYNC_TIMEOUT + 30)
    assert not t.is_alive(), "push hung past sync.timeoutSeconds"
    assert "stats" not in box, "the push completed: the kill did not land mid-push"
    err = box["error"]
    assert isinstance(err, sync.SyncError), repr(err)
    assert "engine 1" in str(err)
    assert box["t1"] - box["t0"] < SYNC_TIMEOUT + 6  # the timeout, plus ≤ 5 s to learn which engine died
    with pytest.raises(sync.SyncError, match="health: engine 1 failed"):
        fleet.health()
    # a new sync group cannot form without engine 1: the rendezvous names it instead of waiting
    t0 = time.monotonic()
    with pytest.raises(sync.SyncError, match="sync group rendezvous failed: engine 1"):
        fleet.sender("cpu")
    assert time.monotonic() - t0 < SYNC_TIMEOUT
