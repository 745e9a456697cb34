"""`rollfleet bench colocated` (one GPU, vLLM): the colocated push of a model shape against the on-GPU
copy ceiling measured in the same run (one `copy_` of the same bytes), with vLLM's sleep (level 2) and
wake times and the GPU's free memory before and after. The production path: a TrainerGroup of one rank,
its engine in the rank's bundle, `ctx.release()` and `ctx.push(model)` (ipc.IpcSender, direct mode:
the model is unsharded on the GPU, so its parameters are shared once and reused)."""

from __future__ import annotations

import statistics
import time
from pathlib import Path
from typing import Any

ENTRY = "rollfleet.bench.colocated:measure"


def _model(ctx, shape: str):
    """A random bf16 model of `shape` on this rank's GPU, its parameters allocated once (the trainer's)."""
    import torch
    from transformers import AutoModelForCausalLM

    from rollfleet.bench.gpu import hf_config

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config(shape), dtype=torch.bfloat16)
    model.to_empty(device=ctx.device)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    return model


def measure(ctx) -> dict[str, Any]:
    import torch

    import os

    # the bench's settings: set in the driver before ray.init, so every Ray worker has them
    shape, repeat = os.environ["ROLLFLEET_BENCH_SHAPE"], int(os.environ["ROLLFLEET_BENCH_REPEAT"])
    free = lambda: round(torch.cuda.mem_get_info(ctx.device)[0] / 2**30, 2)  # noqa: E731
    model = _model(ctx, shape)
    nbytes = sum(p.numel() * p.element_size() for p in model.parameters())
    src = torch.empty(nbytes, dtype=torch.uint8, device=ctx.device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    torch.cuda.synchronize()
    copies = []
    for _ in range(5):
        t0 = time.perf_counter()
        dst.copy_(src)
        torch.cuda.synchronize()
        copies.append(time.perf_counter() - t0)
    del src, dst
    torch.cuda.empty_cache()
    out: dict[str, Any] = {"bytes": nbytes, "tensors": sum(1 for _ in model.parameters()),
                           "copy_ceiling_s": round(statistics.median(copies), 5),
                           "gpu": torch.cuda.get_device_name(ctx.device), "free_gib_engine_awake": free()}
    engine = ctx.fleet.engines[ctx.rank]
    rows = []
    for i in range(repeat + 1):  # the first push shares every parameter's handle: reported apart
        t0 = time.perf_counter()
        ctx.release()
        slept = time.perf_counter() - t0
        free_asleep = free()
        with torch.no_grad():
            model.model.norm.weight.add_(1e-3)  # a new version, in place
        stats = ctx.push(model)
        p = stats.profile[0]
        rows.append({"sleep_s": round(slept, 4), "push_s": round(stats.seconds, 4),
                     "load_rpc_s": round(p["load_rpc_seconds"], 4), "wake_kv_reset_s": round(p["wake_reset_seconds"], 4),
                     "free_gib_asleep": free_asleep, "free_gib_awake": free(), "checksums_ok": stats.checksums_ok})
    health = ray_get(engine.health.remote())
    out.update(first=rows[0], rows=rows[1:], weight_version=health["weight_version"],
               push_s_median=statistics.median(r["push_s"] for r in rows[1:]),
               cycle_s_median=statistics.median(r["sleep_s"] + r["push_s"] for r in rows[1:]))
    out["push_of_ceiling"] = round(out["copy_ceiling_s"] / out["push_s_median"], 3)
    return out


def ray_get(ref):
    import ray

    return ray.get(ref, timeout=120)


def bench_colocated(args) -> dict[str, Any]:
    import os

    import ray
    import torch

    from rollfleet.bench.gpu import model_dir
    from rollfleet.runtime.fleet import Fleet
    from rollfleet.runtime.trainer_group import TrainerGroup
    from rollfleet.spec import load_spec

    model = str(model_dir(args.shape, Path(args.workdir)))
    spec = load_spec({
        "name": "bench", "engine": "vllm",
        "pools": {"colocated": {"gpusPerNode": 1, "gpuProduct": None}},
        "model": {"name": model, "dtype": "bfloat16", "maxModelLen": 2048},
        "vllm": {"enforceEager": True, "gpuMemoryUtilization": args.gpu_memory_utilization,
                 "extraEngineArgs": {"load_format": "dummy"}},
        "sync": {"verifyChecksums": False, "timeoutSeconds": 600}, "rollout": {"maxStaleness": 0},
        "timeouts": {"initSeconds": 1200, "healthSeconds": 600},
    })
    os.environ.update(ROLLFLEET_BENCH_SHAPE=args.shape, ROLLFLEET_BENCH_REPEAT=str(args.repeat))
    ray.init(num_gpus=1, resources={"trainer": 1, "inference": 1}, include_dashboard=False)
    try:
        import vllm

        group = TrainerGroup.start(spec)
        fleet = Fleet.start(spec, model, trainers=group)
        try:
            result = group.run(fleet, ENTRY, timeout_s=1800)
        finally:
            fleet.shutdown()
            group.shutdown()
        return {"bench": "colocated", "shape": args.shape, "torch": torch.__version__, "vllm": vllm.__version__,
                "ray": ray.__version__, **result}
    finally:
        ray.shutdown()
