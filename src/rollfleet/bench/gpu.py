"""`rollfleet bench gpu` (a GPU host): real vLLM engines with a model shape built from a config
(weights `load_format=dummy`, no download): the raw NCCL broadcast ceiling, the streamed bucketed
push, rank 0's peak extra GPU memory during a push, the per-tensor baseline (one push per tensor:
0.14-era open-instruct), bucket sizes (`--profile`) and fan-out over 1..N engines."""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

from rollfleet.bench.workers import ceiling

SHAPES = {  # HF configs (no weights): the tensor names/shapes a trainer pushes
    "qwen2.5-7b": ("Qwen2", dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                                 num_attention_heads=28, num_key_value_heads=4, vocab_size=152064,
                                 tie_word_embeddings=False)),
    "qwen2.5-1.5b": ("Qwen2", dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                                   num_attention_heads=12, num_key_value_heads=2, vocab_size=151936,
                                   tie_word_embeddings=True)),
    "qwen2.5-0.5b": ("Qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                   num_attention_heads=14, num_key_value_heads=2, vocab_size=151936,
                                   tie_word_embeddings=True)),
    "llama-3.2-1b": ("Llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                   num_attention_heads=32, num_key_value_heads=8, vocab_size=128256,
                                   tie_word_embeddings=True, head_dim=64)),
}
CEILING_BYTES = 4 << 30  # the raw broadcast buffer on GPU (DESIGN.md §4: one 4 GiB buffer)


def hf_config(shape: str):
    import transformers

    family, fields = SHAPES[shape]
    cls = getattr(transformers, f"{family}Config")
    return cls(max_position_embeddings=32768, rope_theta=1e6 if family == "Qwen2" else 5e5, rms_norm_eps=1e-6,
               **fields)


def synthetic_params(shape: str, dtype, device) -> list[tuple[str, Any]]:
    """HF-named random tensors of a model shape, in the order a trainer's named_parameters() yields."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(hf_config(shape))
    gen = torch.Generator(device=device).manual_seed(0)
    return [(n, torch.randn(p.shape, dtype=dtype, device=device, generator=gen) * 0.02)
            for n, p in meta.named_parameters()]


def model_dir(shape: str, root: Path) -> Path:
    """config.json of the shape + the tiny model's tokenizer: vLLM builds dummy weights from it."""
    from rollfleet.runtime import tiny

    out = root / f"{shape}-dummy"
    out.mkdir(parents=True, exist_ok=True)
    cfg = hf_config(shape)
    cfg.architectures = [f"{SHAPES[shape][0]}ForCausalLM"]
    cfg.torch_dtype = "bfloat16"
    cfg.save_pretrained(out)
    for f in tiny.ensure().iterdir():
        if "token" in f.name or f.name in ("vocab.json", "merges.txt"):
            shutil.copy(f, out / f.name)
    return out


def gpu_spec(model: str, engines: int, tp: int, bucket_mib: int, extra: dict | None = None):
    from rollfleet.spec import load_spec

    return load_spec({
        "name": "bench", "engine": "vllm",
        "pools": {"trainer": {"gpusPerNode": 1, "gpuProduct": None},
                  "inference": {"gpusPerNode": engines * tp, "gpuProduct": None}},
        "model": {"name": model, "dtype": "bfloat16", "maxModelLen": 2048},
        "vllm": {"tensorParallelSize": tp, "enforceEager": True, "gpuMemoryUtilization": 0.85,
                 "extraEngineArgs": {"load_format": "dummy"}},
        "sync": {"bucketMiB": bucket_mib, "verifyChecksums": False, "timeoutSeconds": 600},
        "timeouts": {"initSeconds": 1200, "healthSeconds": 600}, **(extra or {}),
    })


def median_push(sender, params, repeat: int) -> tuple[list, float]:
    stats = [sender.push(params, verify=False) for _ in range(repeat)]
    return stats, statistics.median(s.seconds for s in stats)


class BenchTrainer:
    """Rank 0 on a trainer GPU holding a random bf16 model of `shape`."""

    def __init__(self, shape: str):
        import torch

        self.device = torch.device("cuda", torch.cuda.current_device())
        self.params = synthetic_params(shape, torch.bfloat16, self.device)
        torch.cuda.synchronize()

    def measure(self, fleet, repeat: int, baseline: bool, profile: bool = False) -> dict[str, Any]:
        import torch

        sender = fleet.sender(self.device)
        nbytes = sum(t.numel() * t.element_size() for _, t in self.params)
        largest = max(t.numel() * t.element_size() for _, t in self.params)
        raw = ceiling(fleet, sender, CEILING_BYTES, 3)
        raw_gbps = CEILING_BYTES / raw / 1e9
        sender.push(self.params, verify=False)  # warm-up: allocator, NCCL channels
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)
        stats, push = median_push(sender, self.params, repeat)
        peak_extra = torch.cuda.max_memory_allocated(self.device) - base
        verified = sender.push(self.params, verify=True)
        out = {"engines": len(fleet.engines), "tp": fleet.spec.vllm.tensor_parallel_size, "bytes": nbytes,
               "tensors": len(self.params), "buckets": stats[0].buckets,
               "ceiling_gbps": round(raw_gbps, 1), "ceiling_s_for_model": round(nbytes / raw_gbps / 1e9, 4),
               "push_s_median": round(push, 4), "push_s_all": [round(s.seconds, 4) for s in stats],
               "push_gbps": round(nbytes / push / 1e9, 1), "of_ceiling": round(nbytes / raw_gbps / 1e9 / push, 3),
               "push_send_s": [round(s.send_seconds, 4) for s in stats], "push_profile": list(stats[-1].profile),
               "rank0_peak_extra_bytes": peak_extra,
               "rank0_bound_bytes": 2 * sender.bucket_bytes + largest,
               "push_verified_s": round(verified.seconds, 4), "checksums_ok": verified.checksums_ok,
               "version": verified.version, "gpu": torch.cuda.get_device_name(self.device)}
        if profile:  # the gap to the ceiling: the raw broadcast at the bucket size, and other bucket sizes
            bucket = sender.bucket_bytes
            out["profile"] = {"ceiling_gbps_at_bucket_size": round(bucket / ceiling(fleet, sender, bucket, 15) / 1e9, 1)}
            for mib in (256, 512, 2048, 4096):
                sender.bucket_bytes = mib << 20
                out["profile"][f"push_bucket_{mib}mib_s"] = round(median_push(sender, self.params, repeat)[1], 4)
            sender.bucket_bytes = bucket
        if baseline:  # one control call + one broadcast per tensor
            seconds, measured = per_tensor_baseline(sender, self.params)
            out.update(per_tensor_rpc_s=round(seconds, 3), per_tensor_rpc_gbps=round(nbytes / seconds / 1e9, 1),
                       per_tensor_rpc_measured_tensors=measured)
        return out


def per_tensor_baseline(sender, params, budget_s: float = 90.0) -> tuple[float, int]:
    """The 0.14-era open-instruct/OpenRLHF pattern: one push (control call, broadcast, ack) per tensor.
    Returns (seconds for all tensors, tensors measured); past `budget_s` the rest is extrapolated."""
    t0 = time.perf_counter()
    for i, item in enumerate(params):
        if time.perf_counter() - t0 > budget_s:  # labelled extrapolation, never silent
            return (time.perf_counter() - t0) / i * len(params), i
        sender.push([item], verify=False)
    return time.perf_counter() - t0, len(params)


def bench_gpu(args) -> dict[str, Any]:
    import ray
    import torch

    from rollfleet.runtime import placement
    from rollfleet.runtime.fleet import Fleet

    gpus = torch.cuda.device_count()
    most = max(args.engines)
    if 1 + most * args.tp > gpus:
        raise SystemExit(f"bench gpu: {most} engine(s) × TP {args.tp} + 1 trainer needs {1 + most * args.tp} GPUs, "
                         f"this host has {gpus}")
    model = str(model_dir(args.shape, Path(args.workdir)))
    spec = gpu_spec(model, most, args.tp, args.bucket_mib)
    ray.init(num_gpus=gpus, resources={"trainer": 1, "inference": gpus - 1}, include_dashboard=False)
    result: dict[str, Any] = {"bench": "gpu", "shape": args.shape, "torch": torch.__version__,
                              "ray": ray.__version__, "bucket_mib": args.bucket_mib, "fanout": []}
    try:
        import vllm

        result["vllm"] = vllm.__version__
        result["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        fleet = Fleet.start(spec, model)
        group = placement.reserve_trainers(spec, 600)
        trainer = ray.remote(BenchTrainer).options(**placement.trainer_options(spec, group[0], 0)).remote(args.shape)
        for k in sorted(args.engines):
            sub = Fleet(gpu_spec(model, k, args.tp, args.bucket_mib), fleet.engines[:k], fleet.groups[:k])
            first = k == min(args.engines)
            row = ray.get(trainer.measure.remote(sub, args.repeat, baseline=first and not args.skip_baseline,
                                                 profile=first and args.profile))
            print(json.dumps(row), flush=True)
            result["fanout"].append(row)
            if args.json:
                Path(args.json).write_text(json.dumps(result, indent=2))
        return result
    finally:
        ray.shutdown()
