"""engine.py without Ray: the CPU stand-in engine, sampling params, start errors, and EngineActor's
lock discipline (health never waits for generate / receive)."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from rollfleet.runtime import demo, sync, tiny
from rollfleet.runtime.engine import (EngineActor, EngineStartError, StandinEngine, _start_error,
                                      sampling_defaults)
from rollfleet.spec import load_spec, runtime_config

PROMPTS = ["The answer to the question is", "hello world, the model says", "One two three four"]


@pytest.fixture(scope="module")
def spec():
    return demo.local_spec()


@pytest.fixture(scope="module")
def model_dir() -> str:
    return str(tiny.ensure())


@pytest.fixture(scope="module")
def engine(spec, model_dir) -> StandinEngine:
    return StandinEngine(spec, model_dir)


@pytest.fixture
def pristine(engine):
    """Restore the engine's weights and clear its cache after a test that changes them."""
    saved = {n: p.detach().clone() for n, p in engine.params.items()}
    yield engine
    engine.load_weights(list(saved.items()))
    engine.reset_prefix_cache()


def _greedy(max_tokens: int = 8) -> dict:
    return sampling_defaults({"max_tokens": max_tokens})


def _ids(outs) -> list[list[int]]:
    return [[s["token_ids"] for s in samples] for samples in outs]


def _perturbed(engine: StandinEngine, seed: int) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(n, p.detach() + 0.5 * torch.randn(p.shape, generator=g)) for n, p in engine.params.items()]


# ---------------------------------------------------------------------------------------------
# sampling params


def test_sampling_defaults_fill_in_and_keep_overrides():
    assert sampling_defaults(None) == {"n": 1, "temperature": 0.0, "top_p": 1.0, "max_tokens": 32, "seed": None}
    assert sampling_defaults({"n": 4, "temperature": 1.0})["n"] == 4
    assert sampling_defaults({"n": 4, "temperature": 1.0})["max_tokens"] == 32


def test_sampling_defaults_reject_unknown_params():
    with pytest.raises(ValueError, match=r"\['top_k'\] not supported"):
        sampling_defaults({"top_k": 5, "n": 2})


# ---------------------------------------------------------------------------------------------
# The stand-in engine


def test_greedy_generate_is_deterministic_and_exactly_max_tokens(engine):
    first = engine.generate(PROMPTS, _greedy(8))
    engine.reset_prefix_cache()  # recompute, not the memo
    second = engine.generate(PROMPTS, _greedy(8))
    assert _ids(first) == _ids(second)
    assert len(first) == len(PROMPTS)
    for samples in first:
        assert len(samples) == 1 and len(samples[0]["token_ids"]) == 8
        assert isinstance(samples[0]["text"], str)


def test_sampling_returns_n_samples_and_a_seed_reproduces_them(engine):
    params = sampling_defaults({"n": 3, "temperature": 1.0, "max_tokens": 6, "seed": 7})
    cached = dict(engine.prefix_cache)
    a = engine.generate(PROMPTS[:2], params)
    b = engine.generate(PROMPTS[:2], params)
    assert [len(s) for s in a] == [3, 3]
    assert _ids(a) == _ids(b)
    assert len({tuple(ids) for samples in _ids(a) for ids in samples}) > 1  # it did sample
    assert engine.prefix_cache == cached  # sampled outputs are never memoized


def test_prefix_cache_goes_stale_on_a_weight_update_until_reset(pristine):
    engine = pristine
    before = engine.generate(PROMPTS, _greedy())
    assert engine.prefix_cache  # greedy outputs are memoized, like vLLM's KV prefix cache
    engine.load_weights(_perturbed(engine, 0))
    stale = engine.generate(PROMPTS, _greedy())
    assert _ids(stale) == _ids(before)  # the memo still answers with the old weights' outputs
    assert engine.reset_prefix_cache() is True
    assert engine.prefix_cache == {}
    fresh = engine.generate(PROMPTS, _greedy())
    assert _ids(fresh) != _ids(before)  # outputs now reflect the loaded weights


def test_outputs_follow_the_loaded_weights(pristine):
    engine = pristine
    original = [(n, p.detach().clone()) for n, p in engine.params.items()]
    base = _ids(engine.generate(PROMPTS, _greedy()))
    engine.load_weights(_perturbed(engine, 1))
    engine.reset_prefix_cache()
    assert _ids(engine.generate(PROMPTS, _greedy())) != base
    engine.load_weights(original)
    engine.reset_prefix_cache()
    assert _ids(engine.generate(PROMPTS, _greedy())) == base  # same weights, same outputs


def test_load_weights_copies_values_into_the_parameters(pristine):
    engine = pristine
    name, p = next(iter(engine.params.items()))
    new = torch.full_like(p, 0.25)
    engine.load_weights([(name, new)])
    assert torch.equal(engine.params[name].detach(), new)
    sums = engine.param_sums([name, "not.a.param"])
    assert sums == [{name: float(new.double().sum())}]  # unknown names are skipped, one dict per TP rank


def test_load_weights_unknown_name_is_a_key_error_naming_it(engine):
    with pytest.raises(KeyError, match="model.layers.99.mlp.up_proj.weight"):
        engine.load_weights([("model.layers.99.mlp.up_proj.weight", torch.zeros(1))])


def test_standin_join_and_receive_over_gloo_load_the_pushed_weights(pristine):
    """The engine side of a push (join as rank 1, receive, load) against a trainer rank 0 here."""
    engine = pristine
    pushed = _perturbed(engine, 2)
    plan = sync.plan_buckets(pushed, 64 << 10, 5, verify=True)  # 64 KiB buckets: several of them
    assert len(plan.buckets) >= 3
    store, port = sync.open_store("127.0.0.1", 2, 10)
    box: dict = {}

    def engine_side():
        try:
            box["ranks"] = engine.join("127.0.0.1", port, 0, 2, 10)
            box["sums"] = engine.receive(plan, 10)
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=engine_side)
    t.start()
    sync.wait_joined(store, 2, 1, 10)
    sender = sync.with_deadline(lambda: sync.make_transport("gloo", store, 0, 2, torch.device("cpu"), 10), 10,
                                "rank 0 init")
    sent = sync.send(plan, [x for _, x in pushed], sender, time.monotonic() + 10)
    t.join(10)
    assert "error" not in box, box.get("error")
    assert box["ranks"] == [1]
    assert [w["checksums"] for w in box["sums"]] == [sent]  # one TP worker, the sender's checksums
    for name, want in pushed:
        assert torch.equal(engine.params[name].detach(), want), name


# ---------------------------------------------------------------------------------------------
# Start errors tell the user what to change


def test_start_error_for_cuda_oom_names_gpu_memory_utilization():
    spec = load_spec({})
    for exc in (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                ValueError("No available memory for the cache blocks. Try increasing gpu_memory_utilization")):
        msg = str(_start_error(spec, 3, exc))
        assert msg.startswith("engine 3:")
        assert "vllm.gpuMemoryUtilization" in msg and "0.8 or 0.7" in msg and "(now 0.9)" in msg


def test_start_error_for_missing_vllm_points_to_the_cpu_standin():
    exc = ModuleNotFoundError("No module named 'vllm'", name="vllm")
    msg = str(_start_error(load_spec({}), 1, exc))
    assert msg.startswith("engine 1:") and "cpu-standin" in msg and "vLLM is not installed" in msg


def test_start_error_otherwise_keeps_the_cause():
    msg = str(_start_error(load_spec({}), 0, OSError("model.safetensors not found")))
    assert msg == "engine 0: failed to start: OSError: model.safetensors not found"
    assert "cpu-standin" not in msg and "gpuMemoryUtilization" not in msg


def test_engine_actor_start_failure_is_translated_and_recorded(model_dir):
    try:  # vLLM is absent on a CPU machine: the ImportError path is real, not simulated
        import vllm  # noqa: F401
        pytest.skip("vLLM is installed here; this checks the message when it is not")
    except ImportError:
        pass
    actor = EngineActor(runtime_config(load_spec({})), 2, model_dir)  # engine: vllm
    with pytest.raises(EngineStartError, match="engine 2: vLLM is not installed.*cpu-standin"):
        actor.start()
    health = actor.health()
    assert health["state"] == "failed" and "vllm" in health["last_error"]


def test_engine_actor_start_failure_for_a_missing_model(spec, tmp_path):
    actor = EngineActor(runtime_config(spec), 0, str(tmp_path / "no-such-model"))
    with pytest.raises(EngineStartError, match="engine 0: failed to start"):
        actor.start()
    assert actor.health()["state"] == "failed"


# ---------------------------------------------------------------------------------------------
# EngineActor: the lock, states, versions, prefix reset


class FakeEngine:
    """Blocks in receive/generate until released, and records prefix-cache resets."""

    kind = "fake"

    def __init__(self, reset_result: bool = True):
        self.release = threading.Event()
        self.resets = 0
        self.reset_result = reset_result

    def receive(self, plan, timeout_s):
        assert self.release.wait(10)
        return [{"checksums": [123], "seconds": 0.0}]  # one dict per TP worker

    def generate(self, prompts, params):
        assert self.release.wait(10)
        return [[{"text": p, "token_ids": [1, 2]}] for p in prompts]

    def reset_prefix_cache(self):
        self.resets += 1
        return self.reset_result


def _actor(spec, engine, index=1) -> EngineActor:
    actor = EngineActor(runtime_config(spec), index, "unused")
    actor.engine = engine
    return actor


def _in_thread(fn, *args):
    box: dict = {}

    def run():
        try:
            box["value"] = fn(*args)
        except BaseException as exc:
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, box


def _wait_state(actor: EngineActor, state: str, timeout_s: float = 10) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        h = actor.health()
        if h["state"] == state:
            return h
        time.sleep(0.01)
    raise AssertionError(f"state never became {state!r}: {actor.health()}")


def test_health_does_not_take_the_engine_lock(spec):
    actor = _actor(spec, FakeEngine())
    with actor.lock:  # as a push or a long generate would hold it
        t, box = _in_thread(actor.health)
        t.join(5)
        assert not t.is_alive(), "health() waited for the engine lock"
    assert box["value"]["engine"] == 1 and box["value"]["state"] == "created"


def test_generate_waits_for_the_lock_and_health_answers_meanwhile(spec):
    fake = FakeEngine()
    actor = _actor(spec, fake)
    actor.version = 4
    t, box = _in_thread(actor.generate, ["a", "b"], {"max_tokens": 2})
    h = _wait_state(actor, "generating")  # health answered while generate holds the lock
    assert h["weight_version"] == 4
    # a second lock user queues behind the generate
    t2, box2 = _in_thread(actor.param_sums, ["x"])
    time.sleep(0.2)
    assert t2.is_alive()
    fake.release.set()
    t.join(5)
    outs = box["value"]
    assert [s["weight_version"] for samples in outs for s in samples] == [4, 4]
    assert [s["engine"] for samples in outs for s in samples] == [1, 1]
    assert actor.health()["state"] == "idle"
    t2.join(5)  # FakeEngine has no param_sums: it fails, but only after getting the lock
    assert isinstance(box2.get("error"), AttributeError)


def test_generate_rejects_unknown_params_before_taking_the_lock(spec):
    actor = _actor(spec, FakeEngine())
    with actor.lock:
        t, box = _in_thread(actor.generate, ["a"], {"best_of": 2})
        t.join(5)
        assert not t.is_alive()
    assert isinstance(box["error"], ValueError)


def test_receive_loads_resets_the_prefix_cache_and_stamps_the_version(spec):
    fake = FakeEngine()
    actor = _actor(spec, fake)
    plan = sync.Plan(version=7, buckets=(), verify=True)
    t, box = _in_thread(actor.receive, plan)
    h = _wait_state(actor, "receiving")  # health answers during a push
    assert h["weight_version"] == 0 and fake.resets == 0
    fake.release.set()
    t.join(5)
    result = box["value"]
    assert result["engine"] == 1 and result["version"] == 7 and result["checksums"] == [[123]]
    assert result["prefix_reset"] is True and fake.resets == 1
    assert actor.health()["weight_version"] == 7 and actor.health()["state"] == "idle"
    fake.release.set()
    outs = actor.generate(["p"], None)
    assert outs[0][0]["weight_version"] == 7


def test_receive_fails_when_the_prefix_cache_reset_fails(spec):
    fake = FakeEngine(reset_result=False)
    fake.release.set()
    actor = _actor(spec, fake, index=2)
    with pytest.raises(sync.SyncError, match=r"engine 2: reset_prefix_cache\(\) returned False after push v3"):
        actor.receive(sync.Plan(version=3, buckets=(), verify=True))
    h = actor.health()
    assert h["weight_version"] == 0  # not stamped: the engine would serve stale KV
    assert h["state"] == "idle" and "reset_prefix_cache" in h["last_error"]
