"""Real vLLM engines on real GPUs (marker `gpu`; skipped where CUDA or vLLM is absent).

Each case runs the production path: Fleet.start (placement groups, EngineActor + vLLM with the
worker extension), the smoke trainer on a trainer GPU as rank 0, NCCL pushes. Asserted per case:
a push changes the outputs, trainer and engine checksums agree, the prefix cache was reset (an
engine raises otherwise), outputs carry the new weight version, and replicated parameters on every
TP rank equal the trainer's.
"""

from __future__ import annotations

import importlib.util

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA GPUs"),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM"),
]

CHECKED = ["model.norm.weight", "model.layers.0.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight"]


@pytest.fixture(scope="module")
def ray_gpus():
    import ray

    n = torch.cuda.device_count()
    ray.init(num_gpus=n, resources={"trainer": 1, "inference": n - 1}, include_dashboard=False)
    yield n
    ray.shutdown()


def gpu_spec(engines: int, tp: int):
    from rollfleet.runtime import tiny
    from rollfleet.spec import load_spec

    return load_spec({
        "name": "gpu-test", "engine": "vllm",
        "pools": {"trainer": {"gpusPerNode": 1, "gpuProduct": None},
                  "inference": {"gpusPerNode": engines * tp, "gpuProduct": None}},
        "model": {"name": tiny.TINY_MODEL, "dtype": "bfloat16", "maxModelLen": 256},
        "vllm": {"tensorParallelSize": tp, "enforceEager": True, "gpuMemoryUtilization": 0.3},
        "sync": {"bucketMiB": 1, "timeoutSeconds": 300},  # 1 MiB buckets: several buckets, both buffers
        "timeouts": {"initSeconds": 900, "healthSeconds": 300},
        "job": {"steps": 2},
    })


@pytest.mark.parametrize("engines,tp", [(1, 1), (2, 1), (1, 2)], ids=["1engine-tp1", "2engines-tp1", "1engine-tp2"])
def test_push_changes_outputs_and_weights_match(ray_gpus, engines, tp):
    import ray

    from rollfleet.runtime import placement, tiny
    from rollfleet.runtime.fleet import Fleet
    from rollfleet.runtime.trainer import SmokeTrainer, passed, table
    from rollfleet.spec import runtime_config

    if 1 + engines * tp > ray_gpus:
        pytest.skip(f"needs {1 + engines * tp} GPUs, this host has {ray_gpus}")
    spec = gpu_spec(engines, tp)
    model = str(tiny.ensure())
    fleet = Fleet.start(spec, model)
    try:
        trainer = ray.remote(SmokeTrainer).options(**placement.trainer_options(spec)).remote(runtime_config(spec), model)
        rows = ray.get(trainer.run.remote(fleet, spec.job.steps), timeout=900)
        print(table(rows))
        assert passed(rows), rows
        assert all(r["checksums_ok"] is True and r["buckets"] > 1 for r in rows)
        assert rows[-1]["version"] == spec.job.steps
        want = ray.get(trainer.param_sums.remote(CHECKED))
        for engine, per_rank in enumerate(fleet.param_sums(CHECKED)):
            assert len(per_rank) == tp
            for rank_sums in per_rank:
                assert rank_sums == want, f"engine {engine}: {rank_sums} != trainer {want}"
        assert all(h["weight_version"] == spec.job.steps and h["state"] == "idle" for h in fleet.health())
    finally:
        fleet.shutdown()
