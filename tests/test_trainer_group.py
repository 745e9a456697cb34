"""trainer_group.py on a real local Ray: 2 trainer ranks (torch.distributed over gloo, FSDP2) next to
2 CPU stand-in engines. Entrypoints come in through the job's runtime env (a working_dir), as a
user's trainer does: a probe module written here, and examples/grpo_trainer.py."""

from __future__ import annotations

import shutil
import threading
import time

import pytest

from rollfleet import demo
from rollfleet.runtime import placement, tiny
from rollfleet.runtime.fleet import Fleet
from rollfleet.runtime.trainer_group import TrainerError, TrainerGroup

from conftest import ROOT

pytestmark = pytest.mark.slow

PROBE = '''
import os, time
import torch
from torch import distributed as dist

def ctx_info(ctx):
    info = {"rank": ctx.rank, "local_rank": ctx.local_rank, "world": ctx.world_size, "node": ctx.node,
            "sender": ctx.sender is not None, "name": ctx.spec.name, "engines": len(ctx.fleet.engines),
            "dist_rank": dist.get_rank(), "dist_world": dist.get_world_size(), "env": os.environ["RANK"],
            "backend": dist.get_backend(), "model": os.path.isdir(ctx.model_path)}
    out = [None] * ctx.world_size
    dist.all_gather_object(out, info)
    return out

def sharded_push(ctx):
    from transformers import AutoModelForCausalLM
    from torch.distributed.fsdp import fully_shard
    from rollfleet.bench.workers import param_sums
    from rollfleet.runtime.push import full_tensors
    model = AutoModelForCausalLM.from_pretrained(ctx.model_path, dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    local = {n: p.to_local().numel() for n, p in model.named_parameters()}
    with torch.no_grad():
        for i, p in enumerate(model.parameters()):
            p.add_(0.1 * (i + 1))  # new weights, the same on every rank's shard math
    stats = ctx.push(model)
    want = {n: float(t.double().sum()) for n, t in full_tensors(model)}  # every rank takes part
    if ctx.rank != 0:
        return None
    return {"stats": [stats.version, stats.checksums_ok, stats.tensors], "want": want, "local": local,
            "engines": [w[0] for w in ctx.fleet.call(param_sums, list(want))], "version": ctx.version}

def fail_on_rank_1(ctx):
    if ctx.rank == 1:
        raise ValueError("boom on rank 1")
    dist.barrier()

def hang_on_rank_1(ctx):
    if ctx.rank == 1:
        time.sleep(120)
    dist.barrier()
'''


@pytest.fixture(scope="module")
def spec():
    return demo.local_spec(["sync.timeoutSeconds=20", "timeouts.healthSeconds=30", "job.steps=2"])


@pytest.fixture(scope="module")
def ray_local(spec, tmp_path_factory):
    work = tmp_path_factory.mktemp("trainer-code")
    (work / "probe.py").write_text(PROBE)
    shutil.copy(ROOT / "examples" / "grpo_trainer.py", work / "grpo_trainer.py")
    ray = demo.start_local_ray(spec, runtime_env={"working_dir": str(work)})
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def fleet(ray_local, spec):
    fleet = Fleet.start(spec, str(tiny.ensure()))
    yield fleet
    fleet.shutdown()


@pytest.fixture
def group(fleet, spec):
    group = TrainerGroup.start(spec)
    yield group
    group.shutdown()


def test_the_entrypoint_runs_on_every_rank_with_its_context(fleet, group):
    infos = group.run(fleet, "probe:ctx_info", timeout_s=60)
    assert [i["rank"] for i in infos] == [0, 1] and [i["dist_rank"] for i in infos] == [0, 1]
    assert [i["local_rank"] for i in infos] == [0, 1] and [i["env"] for i in infos] == ["0", "1"]
    assert all(i["world"] == i["dist_world"] == 2 and i["engines"] == 2 and i["name"] == "local" for i in infos)
    assert [i["sender"] for i in infos] == [True, False]  # only rank 0 joins the weight-sync group
    assert all(i["backend"] == "gloo" and i["model"] for i in infos)


def test_a_push_from_two_sharded_ranks_gives_every_engine_the_unsharded_weights(fleet, group):
    out = group.run(fleet, "probe:sharded_push", timeout_s=120)
    version, checksums_ok, tensors = out["stats"]
    assert checksums_ok is True and tensors == len(out["want"]) and out["version"] == version
    full = sum(out["local"].values())
    assert full < sum(1 for _ in out["want"]) * 10**9  # sanity
    for engine in out["engines"]:
        assert engine == pytest.approx(out["want"], rel=1e-9, abs=1e-9)
    # the ranks really were sharded: rank 0 held about half of every large parameter
    assert out["local"]["model.embed_tokens.weight"] == 1024 * 256 // 2


def test_examples_grpo_trainer_trains_and_pushes_on_every_rank(fleet, group, spec):
    before = fleet.version  # earlier runs on this fleet pushed already: versions go on from there
    result = group.run(fleet, "grpo_trainer:main", timeout_s=300)
    assert result["rank"] == 0 and len(result["mean_reward"]) == spec.job.steps
    assert all(0.0 <= r <= 1.0 for r in result["mean_reward"])
    assert result["version"] == before + spec.job.steps  # one push per step, never a version twice
    assert {h["weight_version"] for h in fleet.health()} == {before + spec.job.steps}


def test_a_rank_that_raises_is_named_with_its_node(fleet, group):
    t0 = time.monotonic()
    with pytest.raises(TrainerError, match=r"trainer rank 1 \(node [\d.]+\) failed: ValueError: boom on rank 1"):
        group.run(fleet, "probe:fail_on_rank_1", timeout_s=60)
    assert time.monotonic() - t0 < 30  # not rank 0's barrier timeout


def test_a_rank_killed_mid_step_is_named(fleet, group):
    import ray

    killer = threading.Timer(3, lambda: ray.kill(group.ranks[1]))
    killer.start()
    t0 = time.monotonic()
    with pytest.raises(TrainerError, match=r"trainer rank 1 \(node [\d.]+\) failed: .*(ActorDied|died)"):
        group.run(fleet, "probe:hang_on_rank_1", timeout_s=60)
    assert time.monotonic() - t0 < 30
    killer.join()


def test_more_ranks_than_the_trainer_pool_has_is_a_placement_error(fleet, spec):
    big = spec.model_copy(update={"pools": spec.pools.model_copy(update={
        "trainer": spec.pools.trainer.model_copy(update={"gpus_per_node": 4})})})
    with pytest.raises(placement.PlacementTimeout, match=r"0/1 trainer placement groups ready after 2 s"):
        placement.reserve_trainers(big, 2)
