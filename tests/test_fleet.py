"""fleet.py + rollout.py on a real local Ray: 2 CPU stand-in engines, the sync group over gloo, rank 0
= this process. One local Ray and one Fleet for the module (engine start dominates the cost). The
faults (engines killed and frozen) are in test_recovery.py, with a fleet of their own."""

from __future__ import annotations

import random
import threading
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

from rollfleet import demo
from rollfleet.runtime import sync, tiny
from rollfleet.bench.workers import param_sums
from rollfleet.runtime.fleet import Fleet
from rollfleet.runtime.push import PushStats
from rollfleet.runtime.rollout import Request, RequestsFailed, RolloutError

from reference import weights

pytestmark = pytest.mark.slow

SYNC_TIMEOUT = 10
OVERRIDES = [f"sync.timeoutSeconds={SYNC_TIMEOUT}", "timeouts.healthSeconds=30", "timeouts.initSeconds=120"]
PROMPTS = ["The answer to the question is", "hello world, the model says", "One two three four",
           "What is the color of the tree?", "red green blue", "one two"]
GREEDY = {"temperature": 0.0, "max_tokens": 12, "ignore_eos": True}
LONG = {"temperature": 0.0, "max_tokens": 200, "ignore_eos": True}


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
    per_engine = fleet.call(param_sums, names)
    assert [len(workers) for workers in per_engine] == [1] * len(fleet.engines)  # the stand-in has TP 1
    return [workers[0] for workers in per_engine]


def greedy_ids(fleet: Fleet) -> list[list[int]]:
    return [s.token_ids for c in fleet.generate(PROMPTS, GREEDY) for s in c.samples]


def test_fleet_starts_one_engine_per_inference_slot(fleet, spec):
    assert spec.engines == 2 and len(fleet.engines) == 2 and len(fleet.groups) == 2
    health = fleet.health()
    assert [h["engine"] for h in health] == [0, 1]
    assert all(h["state"] == "idle" and h["last_error"] is None for h in health)


def test_generate_returns_one_completion_per_prompt_in_order_each_group_on_one_engine(fleet):
    completions = fleet.generate(PROMPTS, {"n": 3, "temperature": 1.0, "max_tokens": 5, "seed": 1,
                                           "ignore_eos": True, "logprobs": True})
    assert len(completions) == len(PROMPTS)
    tok = __import__("transformers").AutoTokenizer.from_pretrained(str(tiny.ensure()))
    for prompt, c in zip(PROMPTS, completions):
        assert c.prompt_token_ids == tok(prompt)["input_ids"]
        assert [s.index for s in c.samples] == [0, 1, 2] and {s.engine for s in c.samples} == {c.engine}
        assert all(len(s.token_ids) == 5 and len(s.logprobs) == 5 and s.finish_reason == "length"
                   and s.prompt_tokens == len(c.prompt_token_ids) for s in c.samples)
    assert {c.engine for c in completions} == {0, 1}


def test_requests_go_to_the_engine_with_the_fewest_samples_in_flight(fleet):
    with fleet.rollouts() as rollouts:
        rollouts.submit([Request(prompt="hello", params={**LONG, "n": 4})])  # engine 0: 4 in flight
        ids = rollouts.submit([Request(prompt=f"p{i}", params={"max_tokens": 2}) for i in range(3)])
        got = {c.request_id: c.engine for c in rollouts.results()}
    assert [got[i] for i in ids] == [1, 1, 1]  # not contiguous chunks: by load


def test_results_arrive_in_completion_order_and_each_is_complete(fleet):
    with fleet.rollouts() as rollouts:
        slow = rollouts.submit([Request(prompt=p, params={**LONG, "n": 2}, tag=f"slow{i}")
                                for i, p in enumerate(PROMPTS[:2])])
        fast = rollouts.submit([Request(prompt=p, params={"n": 2, "max_tokens": 2}, tag=f"fast{i}")
                                for i, p in enumerate(PROMPTS[:2])])
        order = [c for c in rollouts.results()]
    assert {c.request_id for c in order[:2]} == set(fast) and {c.request_id for c in order[2:]} == set(slow)
    assert {c.tag for c in order[:2]} == {"fast0", "fast1"}
    assert all([s.index for s in c.samples] == [0, 1] for c in order)


def test_bad_sampling_params_are_one_error_before_anything_is_sent(fleet):
    with fleet.rollouts() as rollouts:
        with pytest.raises(ValueError, match=r"\['best_of'\] not supported; supported: n, temperature"):
            rollouts.submit([Request(prompt="a"), Request(prompt="b", params={"best_of": 2})])
        assert rollouts.outstanding == 0 and rollouts.stats["submitted"] == 0


def test_push_makes_every_engine_param_equal_the_trainers(fleet, sender, original):
    names = list(original)
    assert all(s == pytest.approx(sums(original), rel=1e-9, abs=1e-9) for s in engine_sums(fleet, names))
    new = perturbed(original, 1)
    version = sender.version
    stats = sender.push(iter(new.items()))  # any iterable, consumed lazily
    assert isinstance(stats, PushStats)
    assert stats.version == version + 1 and stats.engines == 2 and stats.checksums_ok is True
    assert stats.tensors == len(new) and stats.bytes == sum(t.numel() * t.element_size() for t in new.values())
    assert stats.buckets >= 2 and all(p["policy"] == "wait" for p in stats.profile)
    for got in engine_sums(fleet, names):  # every param, on every engine
        assert set(got) == set(names)
        assert got == pytest.approx(sums(new), rel=1e-9, abs=1e-9)


def test_versions_are_stamped_on_samples_and_health_after_a_push(fleet, sender, original):
    stats = sender.push(perturbed(original, 2).items())
    samples = [s for c in fleet.generate(PROMPTS, GREEDY) for s in c.samples]
    assert {(s.admitted_version, s.completed_version) for s in samples} == {(stats.version, stats.version)}
    assert {s.engine for s in samples} == {0, 1}
    assert [h["weight_version"] for h in fleet.health()] == [stats.version, stats.version]


def test_outputs_change_after_a_push_and_return_with_the_old_weights(fleet, sender, original):
    sender.push(original.items())
    base = greedy_ids(fleet)
    assert greedy_ids(fleet) == base  # greedy is deterministic
    sender.push(perturbed(original, 3).items())
    assert greedy_ids(fleet) != base  # the prefix cache was reset: no stale KV from the old weights
    assert sender.push(original.items()).checksums_ok is True
    assert greedy_ids(fleet) == base  # the same weights give the same outputs again


def test_a_full_queue_slows_submission_instead_of_growing(fleet, spec):
    small = Fleet(spec.model_copy(update={"rollout": spec.rollout.model_copy(update={"queue_size": 8})}),
                  fleet.engines, fleet.groups)
    with small.rollouts() as rollouts:
        box: dict = {}
        requests = [Request(prompt=p, params={"n": 4, "max_tokens": 3}) for p in PROMPTS[:4]]  # 16 samples
        producer = threading.Thread(target=lambda: box.update(ids=rollouts.submit(requests, timeout_s=30)))
        producer.start()
        time.sleep(1.5)
        assert producer.is_alive() and rollouts.outstanding <= 8  # blocked at the bound, not growing
        taken = rollouts.take(4)  # taking frees room: the producer finishes
        producer.join(30)
        assert not producer.is_alive() and len(box["ids"]) == 4 and len(taken) == 4
        with pytest.raises(RolloutError, match=r"8 samples outstanding, rollout.queueSize=8.*take results"):
            rollouts.submit(requests, timeout_s=1)  # nobody takes: a clear error, not a hang
        with pytest.raises(ValueError, match="n=9 exceeds rollout.queueSize=8"):
            rollouts.submit([Request(prompt="x", params={"n": 9})])


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(max_staleness=st.integers(0, 2), ahead=st.integers(0, 3),
       lengths=st.lists(st.integers(1, 40), min_size=6, max_size=6), train_ms=st.integers(0, 150))
def test_staleness_bound_holds_under_random_timings(fleet, spec, sender, original, max_staleness, ahead, lengths,
                                                    train_ms):
    variant = Fleet(spec.model_copy(update={"rollout": spec.rollout.model_copy(update={"max_staleness": max_staleness})}),
                    fleet.engines, fleet.groups)
    steps, per_step = 3, 2
    with variant.rollouts() as rollouts:
        def submit(step):
            rollouts.submit([Request(prompt=PROMPTS[i], tag=(step, i), params={
                "n": 2, "max_tokens": lengths[(step * per_step + i) % len(lengths)], "ignore_eos": True})
                for i in range(per_step)])

        for s in range(1, min(1 + ahead, steps) + 1):  # `ahead` may exceed the bound: take() must catch it
            submit(s)
        seen = []
        for step in range(1, steps + 1):
            batch = rollouts.take(per_step, version=sender.version)
            assert all(c.staleness(sender.version) <= max_staleness for c in batch)
            seen += [c.tag for c in batch]
            time.sleep(train_ms / 1000)
            sender.push(original.items())
            if step + 1 + ahead <= steps:
                submit(step + 1 + ahead)
        seen += [c.tag for c in rollouts.results()]  # what is left in flight
        assert sorted(seen) == sorted((s, i) for s in range(1, steps + 1) for i in range(per_step))  # once each
        assert rollouts.stats["max_staleness"] <= max_staleness
        if ahead > max_staleness + 1:
            assert rollouts.stats["stale_resubmitted"] > 0


def test_a_failed_request_is_raised_once_and_what_was_collected_stays_for_the_next_take(fleet):
    with fleet.rollouts() as rollouts:
        good = [Request(prompt=p, params={"max_tokens": 3}, tag=i) for i, p in enumerate(PROMPTS[:2])]
        bad = Request(prompt_token_ids=[5] * 300, tag="long")  # model.maxModelLen is 256: the engine refuses it
        rollouts.submit([*good, bad])
        with pytest.raises(RequestsFailed, match=r"\(tag 'long'\) failed on engine \d: the prompt has 300 tokens"):
            rollouts.take(3)
        kept = rollouts.take(2)  # the completions the first take had collected, or still in flight
        assert sorted(c.tag for c in kept) == [0, 1] and rollouts.stats["failed"] == 1
        with pytest.raises(RolloutError, match="nothing more in flight"):
            rollouts.take(1)
    with fleet.rollouts() as rollouts:
        with pytest.raises(RequestsFailed) as err:
            rollouts.generate([*good, bad])
        assert [c is not None for c in err.value.completions] == [True, True, False]  # beside the error, in order


def test_health_answers_while_a_long_generation_is_in_flight(fleet):
    box: dict = {}

    def long_generate():
        try:
            box["out"] = fleet.generate(PROMPTS * 2, {**LONG, "n": 2, "temperature": 1.0, "seed": 5}, timeout_s=120)
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=long_generate)
    t.start()
    seen: set[int] = set()
    deadline = time.monotonic() + 60
    while len(seen) < 2 and t.is_alive() and time.monotonic() < deadline:
        for h in fleet.health(timeout_s=2):  # would time out if health queued behind generation
            if h["state"] == "generating":
                seen.add(h["engine"])
        time.sleep(0.02)
    t.join(120)
    assert "error" not in box, box.get("error")
    assert seen == {0, 1}, "health never reported generation in flight"
    assert all(len(s.token_ids) == 200 for c in box["out"] for s in c.samples)


# ---- every token from the weights its version names ---------------------------------------------


def variant(fleet: Fleet, staleness: int) -> Fleet:
    spec = fleet.spec.model_copy(update={"rollout": fleet.spec.rollout.model_copy(update={"max_staleness": staleness})})
    return Fleet(spec, fleet.engines, fleet.groups, fleet.supervisor, fleet.vocab_size)


@pytest.mark.parametrize("staleness", [0, 1, 2])
@pytest.mark.parametrize("policy", ["wait", "abort", "keep"])
def test_every_token_comes_from_the_weights_its_version_names(fleet, sender, reference, policy, staleness):
    """Every delivered token regenerated from the weights of the version it is stamped with
    (tests/reference.py), for each in-flight policy at rollout.maxStaleness 0, 1 and 2, with pushes landing
    while requests are in flight: 0 mismatches, 0 lost, 0 duplicated."""
    f = variant(fleet, staleness)
    sender.inflight = policy  # what each engine does with requests in flight during this test's pushes
    sender.push(weights(sender.version + 1).items())  # every version from here on has reference weights
    interrupted = sum(h["interrupted"] for h in f.health())
    rng = random.Random(f"{policy}-{staleness}")
    steps, per_step = 2, 4
    params: dict[tuple, dict] = {}  # tag -> sampling params
    got = []
    with f.rollouts() as rollouts:
        def submit(step):
            requests = []
            for i in range(per_step):
                p = {"n": 3, "temperature": 1.0, "max_tokens": rng.randint(20, 70), "seed": rng.randint(0, 10**6),
                     "logprobs": True}
                if rng.random() < 0.5:
                    p["stop_token_ids"] = [rng.randint(0, 300)]  # some samples end early, some do not
                requests.append(Request(prompt=PROMPTS[rng.randrange(len(PROMPTS))], params=p, tag=(step, i)))
            rollouts.submit(requests)
            params.update({r.tag: r.params for r in requests})  # a stale group is sent again: same tag

        for step in range(1, 2 + staleness):
            submit(step)
        for step in range(1, steps + 1):
            batch = rollouts.take(per_step, version=sender.version)
            assert all(c.staleness(sender.version) <= staleness for c in batch)
            got += batch
            submit(step + 1 + staleness)
            sender.push(weights(sender.version + 1).items())  # lands while the next requests generate
        got += list(rollouts.results())
    sender.inflight = "wait"
    tags = [c.tag for c in got]
    assert len(tags) == len(set(tags)), "a request was delivered twice"
    assert set(tags) == set(params), "a request was lost"
    problems = [line for c in got for line in reference.mismatches(c, params[c.tag])]
    assert problems == []
    for c in got:  # the account covers every token, in order, once
        for s in c.samples:
            assert s.versions[0][0] == 0 and [a for a, _ in s.versions] == sorted({a for a, _ in s.versions})
            assert len(s.token_versions()) == len(s.token_ids) == len(s.logprobs)
            assert policy == "keep" or not s.spans_update  # only keep continues a sample across a push
    if policy != "wait":  # otherwise the test proves nothing about interrupting
        assert sum(h["interrupted"] for h in f.health()) > interrupted, "no push interrupted a sample"
    if policy == "keep":
        assert any(s.spans_update for c in got for s in c.samples), "no sample spans a push"
