"""standin.py: the CPU stand-in engine core behaves like vLLM's where the runtime depends on it —
sampling parameters, continuous batching, a prefix cache that goes stale until reset, resets that
fail while requests run unless they are preempted, and no scheduler step during a weight load."""

from __future__ import annotations

import asyncio
import threading

import pytest
import torch

from rollfleet import demo
from rollfleet.runtime import tiny
from rollfleet.runtime.rollout import sampling_params
from rollfleet.runtime.standin import StandinCore


@pytest.fixture(scope="module")
def loop():
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)


@pytest.fixture(scope="module")
def core(loop):
    core = StandinCore(demo.local_spec(), str(tiny.ensure()))
    run(loop, core.start())
    return core


def run(loop, coro, timeout_s: float = 60):
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout_s)


def ids(core, text: str) -> list[int]:
    return core.tokenizer(text)["input_ids"]


async def _generate(core, prompt, params, salt="s", request="r") -> dict[int, dict]:
    params = sampling_params(params)
    out: dict[int, dict] = {}
    await core.generate(request, [(i, prompt, params) for i in range(params["n"])], salt,
                        lambda i, o: out.__setitem__(i, o))
    return out


def gen(loop, core, prompt, params, salt="s") -> dict[int, dict]:
    return run(loop, _generate(core, prompt, params, salt))


@pytest.fixture
def pristine(core, loop):
    saved = {n: p.detach().clone() for n, p in core.params.items()}
    yield core
    core.load_weights(list(saved.items()))
    run(loop, core.reset_prefix_cache())


def perturb(core, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    core.load_weights([(n, p.detach() + 0.5 * torch.randn(p.shape, generator=g)) for n, p in core.params.items()])


GREEDY = {"temperature": 0.0, "max_tokens": 8, "ignore_eos": True}


# ---- sampling -----------------------------------------------------------------------------------


def test_greedy_is_deterministic_and_honours_max_tokens(loop, core):
    prompt = ids(core, "The answer to the question is")
    a = gen(loop, core, prompt, GREEDY, salt="a")
    b = gen(loop, core, prompt, GREEDY, salt="b")  # another salt: recomputed, not served from the cache
    assert a[0]["token_ids"] == b[0]["token_ids"] and len(a[0]["token_ids"]) == 8
    assert a[0]["finish_reason"] == "length" and a[0]["logprobs"] is None
    assert a[0]["text"] == core.tokenizer.decode(a[0]["token_ids"], skip_special_tokens=True)


def test_n_samples_with_a_seed_reproduce_and_differ_from_each_other(loop, core):
    prompt = ids(core, "hello world")
    params = {"n": 4, "temperature": 1.0, "max_tokens": 6, "seed": 7, "ignore_eos": True}
    a, b = gen(loop, core, prompt, params), gen(loop, core, prompt, params)
    assert sorted(a) == [0, 1, 2, 3]
    assert [a[i]["token_ids"] for i in range(4)] == [b[i]["token_ids"] for i in range(4)]
    assert len({tuple(a[i]["token_ids"]) for i in range(4)}) > 1  # each sample has its own RNG


def test_top_k_1_is_greedy_and_logprobs_are_the_raw_logprobs_of_the_sampled_tokens(loop, core):
    prompt = ids(core, "One two three")
    greedy = gen(loop, core, prompt, {**GREEDY, "logprobs": True}, salt="k")[0]
    top1 = gen(loop, core, prompt, {"temperature": 1.0, "top_k": 1, "max_tokens": 8, "ignore_eos": True,
                                    "logprobs": True, "seed": 3}, salt="k2")[0]
    assert top1["token_ids"] == greedy["token_ids"]
    assert len(greedy["logprobs"]) == 8 and all(lp <= 0 for lp in greedy["logprobs"])
    assert greedy["logprobs"] == pytest.approx(top1["logprobs"], abs=1e-5)


def test_stop_strings_truncate_the_text_unless_included(loop, core):
    prompt = ids(core, "red green blue")
    free = gen(loop, core, prompt, {**GREEDY, "max_tokens": 12}, salt="x")[0]["text"]
    stop = free[3:5]  # a string the greedy continuation is known to contain
    assert stop.strip()
    cut = gen(loop, core, prompt, {**GREEDY, "max_tokens": 12, "stop": [stop]}, salt="y")[0]
    kept = gen(loop, core, prompt, {**GREEDY, "max_tokens": 12, "stop": stop, "include_stop_str_in_output": True},
               salt="z")[0]
    assert cut["finish_reason"] == "stop" and cut["text"] == free[:free.find(stop)]
    assert kept["text"] == free[:free.find(stop) + len(stop)]


def test_stop_token_ids_and_min_tokens(loop, core):
    prompt = ids(core, "the cat and the dog")
    free = gen(loop, core, prompt, GREEDY, salt="m")[0]["token_ids"]
    stopped = gen(loop, core, prompt, {**GREEDY, "stop_token_ids": [free[2]]}, salt="m2")[0]
    assert stopped["finish_reason"] == "stop" and stopped["token_ids"] == free[:free.index(free[2]) + 1]
    held = gen(loop, core, prompt, {**GREEDY, "stop_token_ids": [free[0]], "min_tokens": 4}, salt="m3")[0]
    assert len(held["token_ids"]) >= 4 and free[0] not in held["token_ids"][:4]


# ---- continuous batching -------------------------------------------------------------------------


def test_a_request_admitted_later_finishes_first(loop, core):
    order: list[str] = []

    async def both():
        async def one(name, tokens):
            await _generate(core, ids(core, name), {**GREEDY, "max_tokens": tokens}, salt=name, request=name)
            order.append(name)

        long = asyncio.ensure_future(one("long", 120))
        await asyncio.sleep(0.05)  # the long one is running
        assert core.running
        await one("short", 3)
        await long

    run(loop, both())
    assert order == ["short", "long"]


# ---- prefix cache and resets ---------------------------------------------------------------------


def test_prefix_cache_goes_stale_on_a_weight_update_until_reset(loop, pristine):
    core = pristine
    prompt = ids(core, "What is the color of the tree?")
    before = gen(loop, core, prompt, GREEDY, salt="p")[0]["token_ids"]
    perturb(core, 0)
    stale = gen(loop, core, prompt, GREEDY, salt="p")[0]["token_ids"]
    fresh_salt = gen(loop, core, prompt, GREEDY, salt="p-new")[0]["token_ids"]
    assert run(loop, core.reset_prefix_cache()) is True
    fresh = gen(loop, core, prompt, GREEDY, salt="p")[0]["token_ids"]
    assert fresh == fresh_salt != before  # the new weights' output
    assert stale[0] == before[0] and stale != fresh  # the cached prompt KV is the old weights' (like vLLM)


def test_reset_fails_while_requests_run_unless_they_are_preempted(loop, pristine):
    core = pristine
    prompt = ids(core, "Five six seven")
    baseline = gen(loop, core, prompt, {**GREEDY, "max_tokens": 150}, salt="q")[0]["token_ids"]

    async def scenario():
        task = asyncio.ensure_future(_generate(core, prompt, {**GREEDY, "max_tokens": 150}, salt="q2"))
        while not core.running or not any(c.tokens[0] for c in core.running):
            await asyncio.sleep(0.01)
        refused = await core.reset_prefix_cache()
        perturb(core, 1)
        preempted = await core.reset_prefix_cache(reset_running_requests=True)
        return refused, preempted, (await task)[0]["token_ids"]

    refused, preempted, spanning = run(loop, scenario())
    assert refused is False and preempted is True
    assert len(spanning) == 150 and spanning != baseline  # the tail was generated (and its KV recomputed) anew


def test_no_scheduler_step_runs_while_weights_load(loop, core):
    prompt = ids(core, "Where is the house?")

    async def scenario():
        task = asyncio.ensure_future(_generate(core, prompt, {**GREEDY, "max_tokens": 200}, salt="w"))
        while not core.running or not any(c.tokens[0] for c in core.running):
            await asyncio.sleep(0.01)
        core.paused = True  # what receive() does around the load
        seen = len(core.running[0].tokens[0])
        await asyncio.sleep(0.3)
        frozen = len(core.running[0].tokens[0])
        core.paused = False
        core._wake.set()
        out = await task
        return seen, frozen, out

    seen, frozen, out = run(loop, scenario())
    assert frozen == seen and len(out[0]["token_ids"]) == 200


def test_abort_ends_every_sample_between_two_steps_with_the_tokens_it_has(loop, core):
    prompt = ids(core, "the cat and the dog")

    async def scenario():
        task = asyncio.ensure_future(_generate(core, prompt, {**GREEDY, "n": 2, "max_tokens": 200}, salt="a", request="k"))
        while not core.running or len(core.running[0].tokens[0]) < 10:
            await asyncio.sleep(0.005)
        cohort = core.running[0]
        await core.abort("k")
        at = len(cohort.tokens[0])
        await asyncio.sleep(0.2)
        return await task, (at, len(cohort.tokens[0]))

    out, (at, later) = run(loop, scenario())
    assert at == later == len(out[0]["token_ids"])  # not one step after the abort
    full = gen(loop, core, prompt, {**GREEDY, "n": 2, "max_tokens": 200}, salt="b")
    for i in (0, 1):
        k = len(out[i]["token_ids"])
        assert out[i]["finish_reason"] == "abort" and 10 <= k < 200
        assert out[i]["token_ids"] == full[i]["token_ids"][:k]  # exactly the tokens it had, nothing after


def test_a_continuation_from_its_tokens_so_far_goes_on_as_if_never_stopped(loop, core):
    """What sync.inflight keep does after a push, on the same weights: the same tokens (greedy)."""
    from rollfleet.runtime.engine import continued

    prompt = ids(core, "red green blue")
    params = sampling_params({**GREEDY, "max_tokens": 60})
    full = gen(loop, core, prompt, params)[0]["token_ids"]
    out: dict = {}
    run(loop, core.generate("c", [(0, prompt + full[:25], continued(params, 25))], "c2",
                            lambda i, o: out.__setitem__(i, o)))
    assert full[:25] + out[0]["token_ids"] == full


def test_load_weights_unknown_name_is_a_key_error_naming_it(core):
    with pytest.raises(KeyError, match="model.layers.99.mlp.up_proj.weight"):
        core.load_weights([("model.layers.99.mlp.up_proj.weight", torch.zeros(1))])
