"""placement.py: bundles and actor options per engine kind, and placement on a real local Ray whose
`inference` pool is smaller than the fleet asks for (one inference slot, no GPUs)."""

from __future__ import annotations

import time

import pytest

from rollfleet import demo
from rollfleet.runtime import placement
from rollfleet.spec import load_spec

ONE_ENGINE = ["pools.inference.gpusPerNode=1", "pools.trainer.gpusPerNode=1"]  # the cluster below: 1 slot of each


def vllm_spec(tp: int = 1, gpus: int = 4):
    return load_spec({"pools": {"inference": {"gpusPerNode": gpus}}, "vllm": {"tensorParallelSize": tp},
                      "ncclEnv": {"NCCL_CUMEM_ENABLE": "0", "NCCL_DEBUG": "WARN"}})


# ---------------------------------------------------------------------------------------------
# Pure: bundles and options


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_vllm_engine_bundle_holds_tp_gpus_on_the_inference_pool(tp):
    spec = vllm_spec(tp)
    assert placement.engine_bundle(spec) == {"GPU": tp, "CPU": 1, "inference": tp}
    assert spec.engines == 4 // tp


def test_standin_engine_bundle_takes_one_inference_slot_and_no_gpu():
    assert placement.engine_bundle(demo.local_spec()) == {"CPU": 1, "inference": 1}


def test_a_trainer_rank_takes_one_gpu_of_the_trainer_pool():
    assert placement.trainer_bundle(vllm_spec()) == {"GPU": 1, "CPU": 1, "trainer": 1}
    assert placement.trainer_bundle(demo.local_spec()) == {"CPU": 1, "trainer": 1}


def test_engines_and_trainers_get_identical_nccl_env():
    spec = vllm_spec()
    env = placement.actor_env(spec)["env_vars"]
    assert env["NCCL_CUMEM_ENABLE"] == "0" and env["NCCL_DEBUG"] == "WARN"
    assert env["VLLM_ALLOW_INSECURE_SERIALIZATION"] == "1"


# ---------------------------------------------------------------------------------------------
# A real local Ray: trainer 1, inference 1, no GPUs


@pytest.fixture(scope="module")
def ray_small():
    ray = demo.start_local_ray(demo.local_spec(ONE_ENGINE))
    assert ray.cluster_resources().get("inference") == 1 and ray.cluster_resources().get("trainer") == 1
    yield ray
    ray.shutdown()


def _probe():
    import ray

    @ray.remote
    class Probe:
        def assigned(self):
            import os

            ctx = ray.get_runtime_context()
            return ctx.get_assigned_resources(), os.environ.get("NCCL_CUMEM_ENABLE")

    return Probe


def _base(name: str) -> str:
    """`inference_group_0_<pg id>` (a placement-group-scoped resource) → `inference`."""
    return name.split("_group_")[0]


@pytest.mark.slow
def test_too_few_inference_slots_times_out_listing_requested_and_available(ray_small):
    spec = demo.local_spec()  # 2 engines; the cluster has 1 inference slot
    t0 = time.monotonic()
    with pytest.raises(placement.PlacementTimeout) as err:
        placement.reserve_engines(spec, timeout_s=2)
    elapsed = time.monotonic() - t0
    assert 2 <= elapsed < 10
    msg = str(err.value)
    assert "1/2 engine placement groups ready after 2 s (timeouts.initSeconds)" in msg
    assert "requested {'CPU': 2, 'inference': 2}" in msg
    assert "the cluster has {CPU: 4, inference: 1, trainer: 1}" in msg, msg
    assert "`inference` resource" in msg


@pytest.mark.slow
def test_no_gpus_on_the_inference_pool_times_out_with_zero_groups(ray_small):
    with pytest.raises(placement.PlacementTimeout) as err:
        placement.reserve_engines(vllm_spec(tp=2), timeout_s=1)
    msg = str(err.value)
    assert "0/2 engine placement groups ready" in msg
    assert "'GPU': 4" in msg and "'inference': 4" in msg  # what 2 engines × TP 2 need
    assert "GPU" not in msg.split("the cluster has")[1].split("}")[0]  # and the cluster has none


@pytest.mark.slow
def test_engines_land_on_the_inference_pool_and_trainers_on_the_trainer_pool(ray_small):
    import ray

    spec = demo.local_spec(ONE_ENGINE)
    # a failed reservation above released its groups: the one inference slot is free again
    groups = placement.reserve_engines(spec, timeout_s=30)
    try:
        assert len(groups) == 1
        opts = placement.engine_options(spec, groups[0])
        assert opts["resources"] == {"inference": 1} and "trainer" not in opts["resources"]
        assert opts["num_gpus"] == 0 and opts["max_concurrency"] > 1  # health must not queue behind work
        assert opts["scheduling_strategy"].placement_group is groups[0]
        trainers = placement.reserve_trainers(spec, timeout_s=30)
        groups += trainers
        topts = placement.trainer_options(spec, trainers[0], 0)
        assert topts["resources"] == {"trainer": 1} and topts["num_gpus"] == 0
        assert topts["runtime_env"] == opts["runtime_env"] == placement.actor_env(spec)
        Probe = _probe()
        engine = Probe.options(**opts).remote()
        trainer = Probe.options(**topts).remote()
        (eng_res, eng_env), (tr_res, tr_env) = ray.get([engine.assigned.remote(), trainer.assigned.remote()],
                                                       timeout=60)
        assert {_base(k) for k in eng_res} >= {"inference"} and not any("trainer" in k for k in eng_res)
        assert {_base(k) for k in tr_res} >= {"trainer"} and not any("inference" in k for k in tr_res)
        assert eng_env == tr_env == "0"  # the same NCCL env on both sides
        # the pool is now full: a second engine cannot be placed, even though a trainer slot is free
        with pytest.raises(placement.PlacementTimeout, match="0/1 engine placement groups ready"):
            placement.reserve_engines(spec, timeout_s=1)
        ray.kill(engine)
        ray.kill(trainer)
    finally:
        from ray.util.placement_group import remove_placement_group

        for g in groups:
            remove_placement_group(g)
