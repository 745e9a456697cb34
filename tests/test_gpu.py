"""Real vLLM engines on real GPUs (marker `gpu`; skipped where CUDA or vLLM is absent).

Each case runs the production path: TrainerGroup.start, Fleet.start (AsyncLLM engine actors with the
worker extension; colocated: in the ranks' bundles, sleep mode on), then on the trainer ranks:
1. the built-in GRPO trainer (asynchronous where the layout allows), asserting per step that the push
   changed the outputs, checksums agree, samples carry the new version, staleness stays in its bound;
2. a probe that pushes twice and compares the engines' replicated parameters with the trainer's.
Needs: 1 GPU for the colocated case, 2 for the dedicated cases (3 for fan-out / TP=2).
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
PROBE = '''
import torch
from rollfleet.bench.workers import param_sums
from rollfleet.runtime.trainer_group import full_tensors

CHECKED = %r

def pushes_match(ctx):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(ctx.model_path, dtype=torch.bfloat16).to(ctx.device)
    versions = []
    for step in range(2):
        ctx.release()
        with torch.no_grad():
            for i, p in enumerate(model.parameters()):
                p.add_(0.01 * (i + 1 + step))
        stats = ctx.push(model)
        versions.append(None if stats is None else [stats.version, stats.checksums_ok])
    want = {n: float(t.double().sum()) for n, t in full_tensors(model) if n in CHECKED}
    engines = ctx.fleet.call(param_sums, CHECKED) if ctx.rank == 0 else None
    return {"versions": versions, "want": want, "engines": engines} if ctx.rank == 0 else None
''' % (CHECKED,)


@pytest.fixture(scope="module")
def ray_gpus(tmp_path_factory):
    import ray

    work = tmp_path_factory.mktemp("gpu-probe")
    (work / "gpu_probe.py").write_text(PROBE)
    n = torch.cuda.device_count()
    ray.init(num_gpus=n, resources={"trainer": n, "inference": n}, include_dashboard=False,
             runtime_env={"working_dir": str(work)})
    yield n
    ray.shutdown()


def gpu_spec(layout: str, engines: int = 1, tp: int = 1, inflight: str = "wait"):
    from rollfleet.runtime import tiny
    from rollfleet.spec import load_spec

    common = {
        "name": "gpu-test", "engine": "vllm",
        "model": {"name": tiny.TINY_MODEL, "dtype": "bfloat16", "maxModelLen": 256},
        "sync": {"bucketMiB": 1, "timeoutSeconds": 300, "inflight": inflight},  # 1 MiB: many buckets
        "timeouts": {"initSeconds": 900, "healthSeconds": 300}, "job": {"steps": 3},
    }
    if layout == "colocated":
        return load_spec({**common, "pools": {"colocated": {"gpusPerNode": engines, "gpuProduct": None}},
                          "vllm": {"enforceEager": True, "gpuMemoryUtilization": 0.3},
                          "rollout": {"maxStaleness": 0}})
    return load_spec({**common, "pools": {"trainer": {"gpusPerNode": 1, "gpuProduct": None},
                                          "inference": {"gpusPerNode": engines * tp, "gpuProduct": None}},
                      "vllm": {"tensorParallelSize": tp, "enforceEager": True, "gpuMemoryUtilization": 0.3}})


CASES = {  # id: (layout, engines, tp, inflight, GPUs needed)
    "colocated-tp1": ("colocated", 1, 1, "wait", 1),
    "1engine-tp1-wait": ("dedicated", 1, 1, "wait", 2),
    "1engine-tp1-abort": ("dedicated", 1, 1, "abort", 2),
    "1engine-tp1-keep": ("dedicated", 1, 1, "keep", 2),
    "2engines-tp1": ("dedicated", 2, 1, "wait", 3),
    "1engine-tp2": ("dedicated", 1, 2, "wait", 3),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_the_grpo_loop_and_the_pushes_on_real_engines(ray_gpus, case):
    from rollfleet.runtime import tiny
    from rollfleet.runtime.fleet import Fleet
    from rollfleet.runtime.trainer import passed, table_header, table_row
    from rollfleet.runtime.trainer_group import BUILTIN, TrainerGroup

    layout, engines, tp, inflight, need = case
    if need > ray_gpus:
        pytest.skip(f"needs {need} GPUs, this host has {ray_gpus}")
    spec = gpu_spec(layout, engines, tp, inflight)
    group = TrainerGroup.start(spec)
    fleet = Fleet.start(spec, str(tiny.ensure()), trainers=group)
    try:
        rows = group.run(fleet, BUILTIN, on_report=lambda r: None, timeout_s=900)
        print(table_header())
        for row in rows:
            print(table_row(row))
        assert passed(rows, spec.rollout.max_staleness), rows
        assert all(r["checksums_ok"] is True for r in rows) and rows[-1]["version"] == spec.job.steps
        out = group.run(fleet, "gpu_probe:pushes_match", timeout_s=600)
        assert [v[1] for v in out["versions"]] == [True, True]
        for engine, workers in enumerate(out["engines"]):
            assert len(workers) == tp
            for sums in workers:  # replicated parameters: the same on every TP rank as on the trainer
                assert sums == pytest.approx(out["want"], rel=1e-6), f"engine {engine}: {sums} != {out['want']}"
        assert all(h["state"] == "idle" for h in fleet.health())
    finally:
        fleet.shutdown()
        group.shutdown()
