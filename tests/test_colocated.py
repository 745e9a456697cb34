"""The colocated layout on a real local Ray, CPU: 2 slots, each a trainer rank + a CPU stand-in engine in
one placement-group bundle; the engine sleeps while its rank trains and gets the weights through the
shared-memory STAND-IN for CUDA IPC (ipc.py). Entrypoints come in through the job's runtime env."""

from __future__ import annotations

import pytest

from rollfleet import demo
from rollfleet.runtime import tiny
from rollfleet.runtime.fleet import Fleet
from rollfleet.runtime.trainer_group import TrainerGroup

pytestmark = pytest.mark.slow

PROBE = '''
import time
import torch
from torch import distributed as dist
from rollfleet.bench.workers import param_sums
from rollfleet.runtime.rollout import Request
from rollfleet.runtime.push import full_tensors

GREEDY = {"temperature": 0.0, "max_tokens": 8, "ignore_eos": True}

def model_of(ctx, shard):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(ctx.model_path, dtype=torch.float32)
    if shard:
        from torch.distributed.fsdp import fully_shard
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    return model

def mine(ctx):
    return [s for c in ctx.generate(["The answer is", "red green"], GREEDY) for s in c.samples]

def push_and_compare(ctx, shard):
    start = ctx.version  # the fleet's: versions go on across runs
    model = model_of(ctx, shard)
    before = mine(ctx)
    ctx.release()
    asleep = ctx.fleet.health()[ctx.rank]["state"]
    engine = ctx.fleet.engines[ctx.rank]
    names = [n for n, _ in model.named_parameters()]
    zeroed = ctx.fleet.call(param_sums, names)[ctx.rank][0]  # level 2 discarded the weights
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(0.05 * (i + 1))
    stats = [ctx.push(model)]
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.5)
    stats.append(ctx.push(model))
    want = {n: float(t.double().sum()) for n, t in full_tensors(model)}
    got = ctx.fleet.call(param_sums, names)[ctx.rank][0]
    after = mine(ctx)
    out = [None] * ctx.world_size
    dist.all_gather_object(out, {
        "rank": ctx.rank, "start": start, "asleep": asleep, "zeroed": all(v == 0 for v in zeroed.values()),
        "modes": [s.mode for s in stats], "versions": [s.version for s in stats],
        "checksums": [s.checksums_ok for s in stats], "equal": got == want,
        "engines": {x.engine for x in before + after}, "changed": [x.token_ids for x in before] != [x.token_ids for x in after],
        "stamped": {(x.admitted_version, x.completed_version) for x in after}, "shared": len(getattr(ctx.sender, "shared", {}))})
    return out

def direct(ctx):
    return push_and_compare(ctx, shard=False)

def staged(ctx):
    return push_and_compare(ctx, shard=True)

def waits_while_asleep(ctx):
    # every rank calls release and push (a barrier and an agreement are collectives); rank 0 asks
    start = ctx.version
    model = model_of(ctx, False)
    rollouts = ctx.rollouts()
    ctx.release()
    waiting = None
    if ctx.rank == 0:
        rollouts.submit([Request(prompt="hello", params=GREEDY)])  # queued: the engine sleeps
        time.sleep(1.0)
        waiting = ctx.fleet.health()[0]["queued_requests"]
    stats = ctx.push(model)
    if ctx.rank != 0:
        return None
    (c,) = rollouts.take(1, version=ctx.version)
    rollouts.close()
    return {"waiting": waiting, "start": start, "version": stats.version,
            "sample": (c.samples[0].admitted_version, c.engine)}
'''


@pytest.fixture(scope="module")
def spec():
    return demo.local_spec(["sync.timeoutSeconds=30", "timeouts.healthSeconds=30"], colocated=True)


@pytest.fixture(scope="module")
def ray_local(spec, tmp_path_factory):
    work = tmp_path_factory.mktemp("colocated-code")
    (work / "probe.py").write_text(PROBE)
    ray = demo.start_local_ray(spec, runtime_env={"working_dir": str(work)})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def stack(ray_local, spec):
    """One trainer group and its colocated engines for the module (each run continues the versions)."""
    group = TrainerGroup.start(spec)
    fleet = Fleet.start(spec, str(tiny.ensure()), trainers=group)
    yield group, fleet
    fleet.shutdown()
    group.shutdown()


@pytest.mark.parametrize("mode", ["direct", "staged"])
def test_each_rank_hands_its_weights_to_the_engine_on_its_slot(stack, mode):
    group, fleet = stack
    for r in group.run(fleet, f"probe:{mode}", timeout_s=120):
        assert r["asleep"] == "asleep" and r["zeroed"], r  # released: vLLM sleep level 2 discards the weights
        v = r["start"]
        assert r["modes"] == [mode, mode] and r["versions"] == [v + 1, v + 2] and r["checksums"] == [True, True]
        assert r["equal"], r  # the engine's parameters are the rank's (unsharded) model after the pushes
        assert r["engines"] == {r["rank"]}  # a rank's rollouts stay on its own engine
        assert r["stamped"] == {(v + 2, v + 2)}
        assert r["changed"] or v > 0  # from the base weights (the module's first run) the greedy outputs change
        if mode == "direct":  # the parameters were shared once, in place, and never again
            assert r["shared"] == 26


def test_a_request_made_while_the_engine_sleeps_waits_for_the_push(stack):
    group, fleet = stack
    out = group.run(fleet, "probe:waits_while_asleep", timeout_s=120)
    v = out["start"] + 1
    assert out["waiting"] == 1 and out["version"] == v and out["sample"] == (v, 0)
