"""engine.py without Ray: EngineActor on the real CPU stand-in core, its loop and its threads, with a
trainer rank 0 on this thread pushing over gloo. Requests, results, versions, the three in-flight
policies, a failed push, health during all of it, and start errors."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from rollfleet import demo
from rollfleet.runtime import sync, tiny
from rollfleet.runtime.push import Push
from rollfleet.runtime.engine import EngineActor, EngineStartError, _start_error, vllm_sampling
from rollfleet.runtime.rollout import Request, sampling_params
from rollfleet.spec import load_spec, runtime_config

HOST = "127.0.0.1"
CLIENT = "test"
LONG = {"temperature": 0.0, "max_tokens": 150, "ignore_eos": True}


def make_actor(*sets: str, index: int = 0) -> EngineActor:
    actor = EngineActor(runtime_config(demo.local_spec(["pools.inference.gpusPerNode=1", "sync.timeoutSeconds=20",
                                                        *sets])), index, str(tiny.ensure()))
    actor.start()
    return actor


@pytest.fixture(scope="module")
def actor():
    a = make_actor()
    yield a
    a.stop()


def submit(actor, *requests: Request, client: str = CLIENT) -> list[str]:
    ids = [f"{client}-{time.monotonic_ns()}-{i}" for i in range(len(requests))]
    actor.submit(client, [r.wire(i) for r, i in zip(requests, ids)])
    return ids


def collect(actor, count: int, client: str = CLIENT, timeout_s: float = 60) -> list[dict]:
    out: list[dict] = []
    deadline = time.monotonic() + timeout_s
    while len(out) < count:
        assert time.monotonic() < deadline, f"only {len(out)} of {count} results: {actor.health()}"
        out.extend(actor.poll(client, 0.5)["items"])
    return out


def wait_for(predicate, what: str, timeout_s: float = 30):
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"never: {what}"
        time.sleep(0.01)


class Rank0:
    """The trainer side of the sync group, here: joins the engine(s) and pushes over gloo."""

    def __init__(self, *actors: EngineActor):
        world = 1 + len(actors)
        store, port = sync.open_store(HOST, world, 20)
        joins = [threading.Thread(target=a.join, args=(HOST, port, world, i)) for i, a in enumerate(actors)]
        for t in joins:
            t.start()
        sync.wait_joined(store, world, 1, 20)
        self.transport = sync.with_deadline(
            lambda: sync.make_transport("gloo", store, 0, world, torch.device("cpu"), 20), 20, "rank 0")
        for t in joins:
            t.join(20)
        self.store, self.actors, self.version = store, actors, 0

    def push(self, tensors, send: bool = True) -> list[dict]:
        self.version += 1
        push = Push(self.version, 1 << 20, True, self.actors[0].spec.sync.inflight)
        acks: dict[int, object] = {}

        def receive(i, a):
            try:
                acks[i] = a.receive(push)
            except BaseException as exc:
                acks[i] = exc

        threads = [threading.Thread(target=receive, args=(i, a)) for i, a in enumerate(self.actors)]
        for t in threads:
            t.start()
        if send:
            sent = sync.send(push, tensors, self.transport, time.monotonic() + 20)
        for t in threads:
            t.join(40)
        if send:
            for ack in acks.values():
                assert not isinstance(ack, BaseException), ack
                assert ack["checksums"] == [sent.checksums]
        return [acks[i] for i in range(len(self.actors))]


def weights(seed: int) -> list[tuple[str, torch.Tensor]]:
    from transformers import AutoModelForCausalLM

    g = torch.Generator().manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(tiny.ensure()), dtype=torch.float32)
    return [(n, p.detach() + (0.3 * torch.randn(p.shape, generator=g) if seed else 0))
            for n, p in model.named_parameters()]


def span(sample: dict) -> tuple[int, int]:
    """(the version of a wire sample's first token, of its last)."""
    return sample["versions"][0][1], sample["versions"][-1][1]


def samples_of(results: list[dict]) -> list[dict]:
    return [s for r in results for s in r["samples"]]


def assert_each_sample_once(results: list[dict], n: int) -> None:
    for r in results:
        assert "error" not in r, r
        assert [s["index"] for s in r["samples"]] == list(range(n)), r["id"]


# ---- requests and results ----------------------------------------------------------------------


def test_results_arrive_in_completion_order_and_each_is_complete(actor):
    long_id, = submit(actor, Request(prompt="The answer to the question is", params={**LONG, "n": 2}))
    wait_for(lambda: actor.health()["running_samples"] == 2, "the long request running")
    short_id, = submit(actor, Request(prompt_token_ids=[5, 6, 7], params={"n": 3, "max_tokens": 4,
                                                                           "ignore_eos": True, "seed": 1}))
    results = collect(actor, 2)
    assert [r["id"] for r in results] == [short_id, long_id]
    short, long = results
    assert short["prompt_token_ids"] == [5, 6, 7] and short["engine"] == 0
    assert_each_sample_once([short], 3)
    assert_each_sample_once([long], 2)
    assert all(len(s["token_ids"]) == 4 for s in short["samples"])
    assert all(len(s["token_ids"]) == 150 and s["finish_reason"] == "length" for s in long["samples"])
    assert all(span(s) == (0, 0) for s in samples_of(results))


def test_text_token_ids_and_chat_messages_become_the_prompt_token_ids(actor):
    tok = actor.core.tokenizer
    messages = [{"role": "user", "content": "red green blue"}]
    ids = submit(actor, Request(prompt="red green blue", params={"max_tokens": 2}),
                 Request(messages=messages, params={"max_tokens": 2}))
    by_id = {r["id"]: r for r in collect(actor, 2)}
    assert by_id[ids[0]]["prompt_token_ids"] == tok("red green blue")["input_ids"]
    chat = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert chat.startswith("<|im_start|>user\nred green blue")
    assert by_id[ids[1]]["prompt_token_ids"] == tok(chat, add_special_tokens=False)["input_ids"]


def test_a_prompt_longer_than_the_model_is_an_error_result_naming_max_model_len(actor):
    rid, = submit(actor, Request(prompt_token_ids=[5] * 300))
    (result,) = collect(actor, 1)
    assert result["id"] == rid and "model.maxModelLen is 256" in result["error"]


def test_health_answers_while_the_engine_loop_is_busy(actor):
    actor.loop.call_soon_threadsafe(time.sleep, 2)  # the loop is blocked for 2 s
    t0 = time.monotonic()
    h = actor.health()
    assert time.monotonic() - t0 < 0.5 and h["engine"] == 0 and h["state"] in ("idle", "generating")


def test_cancel_drops_a_clients_requests(actor):
    submit(actor, Request(prompt="hello", params={**LONG, "max_tokens": 250}), client="gone")
    wait_for(lambda: actor.health()["running_samples"] == 1, "running")
    actor.cancel("gone")
    assert actor.health()["running_samples"] == 0 and actor.poll("gone", 0.1)["items"] == []


# ---- pushes under each in-flight policy --------------------------------------------------------


def test_wait_drains_in_flight_samples_on_the_old_weights_then_admits_on_the_new(actor):
    rank0 = Rank0(actor)
    submit(actor, Request(prompt="One two three four", params={**LONG, "n": 2}))
    wait_for(lambda: actor.health()["running_samples"] == 2, "running")
    (ack,) = rank0.push(weights(1))
    late, = submit(actor, Request(prompt="hello", params={"max_tokens": 3}))
    results = collect(actor, 2)
    assert ack["policy"] == "wait" and ack["in_flight"] == 2 and ack["drain_seconds"] > 0
    assert ack["paused_seconds"] >= ack["drain_seconds"]
    first, second = results
    assert_each_sample_once([first], 2)
    assert all(span(s) == (0, 0) for s in first["samples"])
    assert second["id"] == late and span(second["samples"][0])[0] == 1
    assert actor.health()["weight_version"] == 1
    rank0.push(weights(0))  # back to the original weights for the other tests


def test_abort_generates_in_flight_samples_again_on_the_new_weights_and_none_mixes_versions():
    actor = make_actor("sync.inflight=abort")
    try:
        rank0 = Rank0(actor)
        submit(actor, *[Request(prompt=p, params={**LONG, "n": 3, "temperature": 1.0, "seed": i})
                        for i, p in enumerate(["The answer", "hello world", "red green"])])
        wait_for(lambda: actor.health()["running_samples"] == 9, "running")
        (ack,) = rank0.push(weights(2))
        results = collect(actor, 3)
        assert ack["policy"] == "abort" and ack["interrupted"] == 9 and actor.health()["interrupted"] == 9
        assert_each_sample_once(results, 3)  # nothing lost, nothing twice
        assert all(s["versions"] == [(0, 1)] for s in samples_of(results))  # every token from the new weights
        assert all(len(s["token_ids"]) == 150 for s in samples_of(results))
    finally:
        actor.stop()


def test_abort_keeps_the_finished_samples_of_a_group_and_restarts_only_the_others():
    actor = make_actor("sync.inflight=abort")
    try:
        rank0 = Rank0(actor)
        # one in 40 token ids stops a sample: the four samples end at different steps, so the push lands
        # when some are done and others run
        rid, = submit(actor, Request(prompt="hello world, the model says", params={
            "n": 4, "temperature": 1.0, "seed": 7, "max_tokens": 200, "stop_token_ids": list(range(0, 1100, 40))}))
        wait_for(lambda: 0 < actor.health()["completed"] and actor.health()["running_samples"] > 0, "part done", 60)
        done_before = actor.health()["completed"]
        (ack,) = rank0.push(weights(4))
        (result,) = collect(actor, 1)
        assert result["id"] == rid and "error" not in result
        assert [s["index"] for s in result["samples"]] == [0, 1, 2, 3]
        old = [s for s in result["samples"] if s["versions"] == [(0, 0)]]
        new = [s for s in result["samples"] if s["versions"] == [(0, 1)]]
        assert len(old) >= done_before and len(new) == 4 - len(old) == ack["interrupted"] > 0  # a group may mix
    finally:
        actor.stop()


def test_keep_freezes_in_flight_samples_across_the_update_and_they_say_so():
    actor = make_actor("sync.inflight=keep")
    try:
        rank0 = Rank0(actor)
        baseline = submit(actor, Request(prompt="the cat and the dog", params=LONG))
        (unchanged,) = collect(actor, 1)
        submit(actor, Request(prompt="the cat and the dog", params=LONG))
        wait_for(lambda: actor.core.running and len(actor.core.running[0].tokens[0]) > 20, "20 tokens in")
        (ack,) = rank0.push(weights(3))
        (spanning,) = collect(actor, 1)
        s = spanning["samples"][0]
        assert ack["policy"] == "keep" and ack["in_flight"] == 1 and ack["interrupted"] == 1
        assert span(s) == (0, 1)
        (first, v0), (switch, v1) = s["versions"]
        assert (first, v0, v1) == (0, 0, 1) and switch >= 20 and len(s["token_ids"]) == 150
        old = unchanged["samples"][0]["token_ids"]
        assert s["token_ids"][:switch] == old[:switch] and s["token_ids"] != old  # old weights first, new after
        assert baseline
    finally:
        actor.stop()


def test_a_failed_push_leaves_the_engine_stale_holding_its_requests_until_a_push_reaches_it():
    actor = make_actor("sync.timeoutSeconds=2")
    try:
        rank0 = Rank0(actor)
        box: dict = {}
        pushing = threading.Thread(target=lambda: box.update(ack=rank0.push([], send=False)))
        pushing.start()  # rank 0 never sends: the receive times out
        wait_for(lambda: actor.health()["state"] == "receiving", "receiving")
        queued, = submit(actor, Request(prompt="hello"))  # admission is closed during a push: it waits
        pushing.join(30)
        (ack,) = box["ack"]
        assert isinstance(ack, sync.SyncError) and "engine 0: push v1 failed" in str(ack)
        h = actor.health()
        assert h["state"] == "stale" and h["sync_group"].startswith("broken") and h["weight_version"] == 0
        assert "undefined until the next push reaches it" in h["last_error"] and h["queued_requests"] == 1
        assert actor.poll(CLIENT, 0.5)["items"] == []  # nothing is served on undefined weights
        rank0 = Rank0(actor)  # the group forms again; the next push re-admits the engine
        rank0.version = 1
        rank0.push(weights(0))
        (result,) = collect(actor, 1)
        assert result["id"] == queued and result["samples"][0]["versions"] == [(0, 2)]
    finally:
        actor.stop()


class _NoReset:
    """A core whose prefix-cache reset fails (what vLLM reports while blocks are still in use)."""

    kind = "fake"

    async def receive(self, push, timeout_s):
        return [{"checksums": [], "seconds": 0.0}]

    async def reset_prefix_cache(self, reset_running_requests=False):
        return False


def test_a_prefix_cache_reset_that_fails_is_an_error_and_the_version_is_not_stamped():
    from rollfleet.runtime.engine import Scheduler

    actor = EngineActor(runtime_config(demo.local_spec()), 2, "unused")
    actor.core = _NoReset()
    actor.sched = Scheduler(2, actor.spec, actor.core)
    with pytest.raises(sync.SyncError, match=r"engine 2: push v3 failed .*reset_prefix_cache\(\) returned False"):
        actor.receive(Push(3, 1 << 20, True))
    assert actor.health()["weight_version"] == 0 and "stale KV" in actor.health()["last_error"]


class _Ordered:
    """A core that records when each call was made and lets a receive finish only when told."""

    kind = "fake"

    def __init__(self):
        import asyncio

        self.calls: list[str] = []
        self.release = asyncio.Event()

    async def receive(self, push, timeout_s):
        self.calls.append("receive")
        await self.release.wait()
        self.calls.append("received")
        return [{"checksums": [], "seconds": 0.0}]

    async def reset_prefix_cache(self, reset_running_requests=False):
        self.calls.append("reset")
        return True


def test_a_push_is_one_engine_core_round_trip_the_reset_sent_right_behind_the_receive():
    from rollfleet.runtime.engine import Scheduler

    actor = EngineActor(runtime_config(demo.local_spec()), 0, "unused")
    actor.core = _Ordered()
    actor.sched = Scheduler(0, actor.spec, actor.core)
    t, box = None, {}
    t = threading.Thread(target=lambda: box.update(ack=actor.receive(Push(1, 1 << 20, True))))
    t.start()
    wait_for(lambda: actor.core.calls[:2] == ["receive", "reset"], "both calls sent")  # before the receive is done
    actor.loop.call_soon_threadsafe(actor.core.release.set)
    t.join(10)
    assert actor.core.calls == ["receive", "reset", "received"] and box["ack"]["version"] == 1


# ---- vLLM's sampling params, start errors --------------------------------------------------------


def test_vllm_sampling_is_one_engine_request_per_sample_with_its_own_seed():
    params = sampling_params({"n": 4, "seed": 10, "logprobs": True, "stop": "x", "top_k": 5})
    kw = vllm_sampling(params, 2)
    assert kw["n"] == 1 and kw["seed"] == 12 and kw["logprobs"] == 0 and kw["stop"] == ["x"]
    assert kw["top_k"] == 5 and kw["stop_token_ids"] is None
    plain = vllm_sampling(sampling_params(None), 0)
    assert plain["seed"] is None and plain["logprobs"] is None and plain["stop"] is None


def test_start_error_for_cuda_oom_names_gpu_memory_utilization():
    spec = load_spec({})
    for exc in (RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB"),
                ValueError("No available memory for the cache blocks. Try increasing gpu_memory_utilization")):
        msg = str(_start_error(spec, 3, exc))
        assert msg.startswith("engine 3:")
        assert "vllm.gpuMemoryUtilization" in msg and "0.8 or 0.7" in msg and "(now 0.9)" in msg


def test_start_error_otherwise_keeps_the_cause():
    msg = str(_start_error(load_spec({}), 0, OSError("model.safetensors not found")))
    assert msg == "engine 0: failed to start: OSError: model.safetensors not found"


def test_engine_actor_start_failure_is_translated_and_recorded():
    try:  # vLLM is absent on a CPU machine: the ImportError path is real, not simulated
        import vllm  # noqa: F401
        pytest.skip("vLLM is installed here; this checks the message when it is not")
    except ImportError:
        pass
    actor = EngineActor(runtime_config(load_spec({})), 2, str(tiny.ensure()))  # engine: vllm
    with pytest.raises(EngineStartError, match="engine 2: vLLM is not installed.*cpu-standin"):
        actor.start()
    health = actor.health()
    assert health["state"] == "failed" and "vllm" in health["last_error"]


def test_engine_actor_start_failure_for_a_missing_model(tmp_path):
    actor = EngineActor(runtime_config(demo.local_spec()), 0, str(tmp_path / "no-such-model"))
    with pytest.raises(EngineStartError, match="engine 0: failed to start"):
        actor.start()
    assert actor.health()["state"] == "failed"


def test_vllm_core_builds_the_engine_arguments_from_the_spec(monkeypatch, capsys):
    """VllmCore.start's AsyncEngineArgs, with vLLM's two entry points stood in (no vLLM on CPU): what
    the spec sets, extraEngineArgs on top (disable_log_stats is only a default), sleep mode colocated only;
    vLLM's Ray stat logger unless extraEngineArgs turns the stats off."""
    import asyncio
    import sys
    import types

    from rollfleet.runtime.engine import EXTENSION, VllmCore

    made = {}

    class Args:
        def __init__(self, **kwargs):
            made.update(kwargs)
            self.__dict__.update(kwargs)

    class Logger:
        pass

    class Llm:
        model_config = types.SimpleNamespace(max_model_len=4096, get_vocab_size=lambda: 1024)

        @classmethod
        def from_engine_args(cls, args, stat_loggers=None):
            made["stat_loggers"] = stat_loggers
            return cls()

    model = str(tiny.ensure())
    spec = load_spec({"vllm": {"tensorParallelSize": 2, "extraEngineArgs": {"disable_log_stats": True,
                                                                          "kv_cache_dtype": "fp8"}},
                      "pools": {"inference": {"gpusPerNode": 2}}})
    colocated = load_spec({**runtime_config(demo.local_spec([], colocated=True)), "engine": "vllm"})
    for name, attrs in {"vllm": {}, "vllm.engine": {}, "vllm.engine.arg_utils": {"AsyncEngineArgs": Args},
                        "vllm.v1": {}, "vllm.v1.engine": {}, "vllm.v1.engine.async_llm": {"AsyncLLM": Llm},
                        "vllm.v1.metrics": {}, "vllm.v1.metrics.ray_wrappers": {"RayPrometheusStatLogger": Logger}}.items():
        monkeypatch.setitem(sys.modules, name, types.SimpleNamespace(**attrs))
    asyncio.run(VllmCore(spec, model).start())
    assert made["model"] == model and made["tensor_parallel_size"] == 2
    assert made["distributed_executor_backend"] == "mp" and made["worker_extension_cls"] == EXTENSION
    assert made["gpu_memory_utilization"] == 0.9 and made["enable_prefix_caching"] is True
    assert made["disable_log_stats"] is True and made["stat_loggers"] is None and made["kv_cache_dtype"] == "fp8"
    assert made["enable_sleep_mode"] is False
    made.clear()
    asyncio.run(VllmCore(colocated, model).start())
    assert made["enable_sleep_mode"] is True
    assert made["disable_log_stats"] is False and made["stat_loggers"] == [Logger]  # vLLM's metrics through Ray
    assert made["distributed_executor_backend"] == "uni"
    # where ray.serve does not import, vLLM's wrapper has no ray_metrics: its default loggers, and one line
    made.clear()
    monkeypatch.setitem(sys.modules, "vllm.v1.metrics.ray_wrappers",
                        types.SimpleNamespace(RayPrometheusStatLogger=Logger, ray_metrics=None))
    asyncio.run(VllmCore(colocated, model).start())
    assert made["disable_log_stats"] is False and made["stat_loggers"] is None
    assert "vLLM's Ray stat logger is unavailable here" in capsys.readouterr().out
