"""`rollfleet bench`: speed is measured here and written down, never asserted in tests.

`bench sync` (CPU, here): push bandwidth against the raw gloo broadcast ceiling measured in the same
run, at several model sizes. Receivers are `SyncSink` actors, a STAND-IN for engines that joins the
group like an engine and loads into plain tensors instead of a model.

`bench gpu` (a GPU host): real vLLM engines with a model shape built from a config (weights
`load_format=dummy`, no download): the raw NCCL broadcast ceiling, the bucketed push, the
per-tensor-RPC baseline (0.14-era open-instruct), fan-out over 1..N engines, and generation tokens/s
through the engine actor vs a bare vLLM `LLM` on the same GPU and prompts.
"""

from __future__ import annotations

import json
import shutil
import statistics
import time
from pathlib import Path
from typing import Any

SHAPES = {  # HF Qwen2 configs (no weights): the tensor names/shapes a trainer pushes
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
}
CEILING_BYTES = 4 << 30  # the raw broadcast buffer on GPU (DESIGN.md §4: one 4 GiB buffer)


def qwen2_config(shape: str):
    from transformers import Qwen2Config

    return Qwen2Config(max_position_embeddings=32768, rope_theta=1e6, rms_norm_eps=1e-6, **SHAPES[shape])


def synthetic_params(shape: str, dtype, device) -> list[tuple[str, Any]]:
    """HF-named random tensors of a model shape, in the order a trainer's named_parameters() yields."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        meta = AutoModelForCausalLM.from_config(qwen2_config(shape))
    gen = torch.Generator(device=device).manual_seed(0)
    return [(n, torch.randn(p.shape, dtype=dtype, device=device, generator=gen) * 0.02)
            for n, p in meta.named_parameters()]


def cpu_params(total_mib: int) -> list[tuple[str, Any]]:
    """Transformer-like float32 tensors adding up to ~total_mib: 4 MiB matrices plus small vectors."""
    import torch

    out, layer = [], 0
    while sum(t.numel() * 4 for _, t in out) < total_mib << 20:
        out.append((f"layers.{layer}.weight", torch.randn(1024, 1024)))
        out.append((f"layers.{layer}.norm", torch.randn(1024)))
        layer += 1
    return out


def median_push(sender, params, repeat: int, verify: bool | None = None):
    stats = [sender.push(params, verify=verify) for _ in range(repeat)]
    return stats, statistics.median(s.seconds for s in stats)


def median_push_kw(sender, params, repeat: int, **kw) -> float:
    return statistics.median(sender.push(params, verify=False, **kw).seconds for _ in range(repeat))


def ceiling(fleet, sender, nbytes: int, iters: int) -> float:
    """Seconds per raw broadcast of one `nbytes` buffer to every engine, measured on this group."""
    from rollfleet.runtime import sync
    from rollfleet.runtime.fleet import gather

    deadline = time.monotonic() + sender.timeout_s
    futures = [e.raw_broadcast.remote(nbytes, iters) for e in fleet.engines]
    seconds = sync.raw_broadcast(sender.transport, nbytes, iters, deadline)
    gather(futures, deadline, "raw broadcast", f"sync.timeoutSeconds={sender.timeout_s}")
    return seconds


def per_tensor_baseline(fleet, sender, params, budget_s: float = 90.0) -> tuple[float, int]:
    """The 0.14-era open-instruct/OpenRLHF pattern: one control call + one broadcast per tensor.
    Returns (seconds for all tensors, tensors measured); past `budget_s` the rest is extrapolated."""
    from rollfleet.runtime import sync
    from rollfleet.runtime.fleet import gather

    t0 = time.perf_counter()
    for i, (name, tensor) in enumerate(params):
        if time.perf_counter() - t0 > budget_s:  # labelled extrapolation, never silent
            return (time.perf_counter() - t0) / i * len(params), i
        plan = sync.plan_buckets([(name, tensor)], 1 << 62, sender.version, False)
        deadline = time.monotonic() + sender.timeout_s
        acks = [e.receive.remote(plan, False) for e in fleet.engines]
        sync.send(plan, [tensor], sender.transport, deadline)
        gather(acks, deadline, f"per-tensor {name}", f"sync.timeoutSeconds={sender.timeout_s}")
    return time.perf_counter() - t0, len(params)


# ---------------------------------------------------------------------------------------------
# CPU: bench sync


class SyncSink:
    """Bench-only STAND-IN receiver: joins the gloo group as an engine would and loads each push into
    plain tensors (the stand-in for load_weights)."""

    def __init__(self, index: int, timeout_s: float):
        import torch

        torch.set_num_threads(1)
        self.index, self.timeout_s, self.tensors, self.transport = index, timeout_s, {}, None

    def join(self, host: str, port: int, world_size: int) -> list[int]:
        import torch

        from rollfleet.runtime import sync

        rank = sync.rank_of(self.index, 0, 1)
        self.transport = sync.join("gloo", host, port, rank, world_size, torch.device("cpu"), self.timeout_s)
        return [rank]

    def _load(self, weights) -> None:
        for name, t in weights:
            if name not in self.tensors:
                self.tensors[name] = t.clone()
            else:
                self.tensors[name].copy_(t)

    def receive(self, plan, finalize: bool = True) -> dict[str, Any]:
        from rollfleet.runtime import sync

        t0 = time.perf_counter()
        sums = sync.receive(plan, self.transport, self._load, time.monotonic() + self.timeout_s)
        return {"engine": self.index, "version": plan.version, "checksums": [sums], "prefix_reset": True,
                "worker_seconds": time.perf_counter() - t0}

    def raw_broadcast(self, nbytes: int, iters: int) -> list[float]:
        from rollfleet.runtime import sync

        return [sync.raw_broadcast(self.transport, nbytes, iters, time.monotonic() + self.timeout_s)]


def bench_sync(args) -> dict[str, Any]:
    import ray
    import torch

    from rollfleet.runtime import demo
    from rollfleet.runtime.fleet import Fleet

    spec = demo.local_spec([f"pools.inference.gpusPerNode={args.engines}", f"sync.bucketMiB={args.bucket_mib}",
                            "sync.timeoutSeconds=120"])
    demo.start_local_ray(spec)
    try:
        sinks = [ray.remote(SyncSink).options(num_cpus=1, resources={"inference": 1}).remote(i, 120)
                 for i in range(spec.engines)]
        fleet = Fleet(spec, sinks, [])
        sender = fleet.sender("cpu")
        rows = []
        for size in args.sizes_mib:
            params = cpu_params(size)
            nbytes = sum(t.numel() * t.element_size() for _, t in params)
            raw = ceiling(fleet, sender, nbytes, args.repeat)
            stats, push = median_push(sender, params, args.repeat)
            rows.append({"size_mib": round(nbytes / 2**20), "tensors": len(params), "buckets": stats[0].buckets,
                         "engines": spec.engines, "ceiling_s": round(raw, 4),
                         "ceiling_gbps": round(nbytes / raw / 1e9, 3), "push_s": round(push, 4),
                         "push_gbps": round(nbytes / push / 1e9, 3), "of_ceiling": round(raw / push, 3),
                         "checksums_ok": all(s.checksums_ok for s in stats)})
        return {"bench": "sync", "transport": "gloo (CPU stand-in for NCCL)", "torch": torch.__version__,
                "ray": ray.__version__, "bucket_mib": args.bucket_mib, "rows": rows}
    finally:
        ray.shutdown()


# ---------------------------------------------------------------------------------------------
# GPU: bench gpu (real vLLM engines)


class BenchTrainer:
    """Rank 0 on a trainer GPU holding a random model of `shape` (bf16)."""

    def __init__(self, shape: str):
        import torch

        self.device = torch.device("cuda", torch.cuda.current_device())
        self.params = synthetic_params(shape, torch.bfloat16, self.device)
        torch.cuda.synchronize()

    def measure(self, fleet, repeat: int, baseline: bool, profile: bool = False) -> dict[str, Any]:
        import torch

        sender = fleet.sender(self.device)
        nbytes = sum(t.numel() * t.element_size() for _, t in self.params)
        raw = ceiling(fleet, sender, CEILING_BYTES, 3)
        raw_gbps = CEILING_BYTES / raw / 1e9
        sender.push(self.params, verify=False)  # warm-up: allocator, NCCL channels
        stats, push = median_push(sender, self.params, repeat, verify=False)
        verified = sender.push(self.params, verify=True)
        out = {"engines": len(fleet.engines), "tp": fleet.spec.vllm.tensor_parallel_size, "bytes": nbytes,
               "tensors": len(self.params), "buckets": stats[0].buckets,
               "ceiling_gbps": round(raw_gbps, 1), "ceiling_s_for_model": round(nbytes / raw_gbps / 1e9, 4),
               "push_s_median": round(push, 4), "push_s_all": [round(s.seconds, 4) for s in stats],
               "push_gbps": round(nbytes / push / 1e9, 1), "of_ceiling": round(nbytes / raw_gbps / 1e9 / push, 3),
               "push_send_s": [round(s.send_seconds, 4) for s in stats], "push_profile": list(stats[-1].profile),
               "push_verified_s": round(verified.seconds, 4), "checksums_ok": verified.checksums_ok,
               "version": verified.version, "gpu": torch.cuda.get_device_name(self.device)}
        if profile:  # decompose the gap to the ceiling
            bucket = fleet.spec.sync.bucket_mib << 20
            raw_bucket = ceiling(fleet, sender, bucket, 15)
            out["profile"] = {
                "ceiling_gbps_at_bucket_size": round(bucket / raw_bucket / 1e9, 1),
                "push_no_load_s": round(median_push_kw(sender, self.params, repeat, load=False), 4),
                **{f"push_bucket_{mib}mib_s": round(median_push_kw(sender, self.params, repeat, bucket_mib=mib), 4)
                   for mib in (256, 512, 2048, 4096)},
            }
        if baseline:
            seconds, measured = per_tensor_baseline(fleet, sender, self.params)
            out.update(per_tensor_rpc_s=round(seconds, 3), per_tensor_rpc_gbps=round(nbytes / seconds / 1e9, 1),
                       per_tensor_rpc_measured_tensors=measured)
        return out


def bare_generate(spec_json: dict[str, Any], model: str, prompts: list[str], params: dict[str, Any]) -> dict[str, Any]:
    """A bare vLLM LLM with the engine's exact arguments (no actor, no extension)."""
    from rollfleet.runtime.engine import VllmEngine
    from rollfleet.spec import load_spec

    engine = VllmEngine(load_spec(spec_json), model)
    engine.generate(prompts[:4], params)  # warm-up
    t0 = time.perf_counter()
    outs = engine.generate(prompts, params)
    seconds = time.perf_counter() - t0
    tokens = sum(len(s["token_ids"]) for samples in outs for s in samples)
    engine.llm.llm_engine.engine_core.shutdown()  # give the GPU back before the fleet starts
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1)}


def actor_generate(fleet, prompts: list[str], params: dict[str, Any]) -> dict[str, Any]:
    """The same prompts through the engine actor (Fleet.generate → EngineActor → vLLM)."""
    fleet.generate(prompts[:4], params)  # warm-up
    t0 = time.perf_counter()
    outs = fleet.generate(prompts, params)
    seconds = time.perf_counter() - t0
    tokens = sum(len(o.token_ids) for o in outs)
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1)}


def model_dir(shape: str, root: Path) -> Path:
    """config.json of the shape + the tiny model's tokenizer: vLLM builds dummy weights from it."""
    from rollfleet.runtime import tiny

    out = root / f"{shape}-dummy"
    out.mkdir(parents=True, exist_ok=True)
    cfg = qwen2_config(shape)
    cfg.architectures = ["Qwen2ForCausalLM"]
    cfg.torch_dtype = "bfloat16"
    cfg.save_pretrained(out)
    for f in tiny.ensure().iterdir():
        if "token" in f.name or f.name == "vocab.json" or f.name == "merges.txt":
            shutil.copy(f, out / f.name)
    return out


def gpu_spec(args, model: str, engines: int):
    from rollfleet.spec import load_spec

    return load_spec({
        "name": "bench", "engine": "vllm",
        "pools": {"trainer": {"gpusPerNode": 1, "gpuProduct": None},
                  "inference": {"gpusPerNode": engines * args.tp, "gpuProduct": None}},
        "model": {"name": model, "dtype": "bfloat16", "maxModelLen": 2048},
        "vllm": {"tensorParallelSize": args.tp, "enforceEager": True, "gpuMemoryUtilization": 0.85,
                 "extraEngineArgs": {"load_format": "dummy"}},
        "sync": {"bucketMiB": args.bucket_mib, "verifyChecksums": False, "timeoutSeconds": 600},
        "timeouts": {"initSeconds": 1200, "healthSeconds": 600},
    })


def bench_gpu(args) -> dict[str, Any]:
    import ray
    import torch

    from rollfleet.runtime import placement
    from rollfleet.runtime.fleet import Fleet
    from rollfleet.spec import runtime_config

    gpus = torch.cuda.device_count()
    most = max(args.engines)
    if 1 + most * args.tp > gpus:
        raise SystemExit(f"bench gpu: {most} engine(s) × TP {args.tp} + 1 trainer needs {1 + most * args.tp} GPUs, "
                         f"this host has {gpus}")
    model = str(model_dir(args.shape, Path(args.workdir)))
    spec = gpu_spec(args, model, most)
    ray.init(num_gpus=gpus, resources={"trainer": 1, "inference": gpus - 1}, include_dashboard=False)
    result: dict[str, Any] = {"bench": "gpu", "shape": args.shape, "torch": torch.__version__,
                              "ray": ray.__version__, "bucket_mib": args.bucket_mib, "fanout": []}
    try:
        import vllm

        result["vllm"] = vllm.__version__
        result["nccl"] = ".".join(map(str, torch.cuda.nccl.version()))
        one_spec = gpu_spec(args, model, 1)
        prompts = [f"Question {i}: what is {i} plus {i * 7}? Answer:" for i in range(args.prompts)]
        params = {"temperature": 0.0, "max_tokens": args.gen_tokens}
        if not args.skip_generate:
            # bare vLLM first, in a worker that exits afterwards (max_calls=1) so its GPU memory is returned
            result["generate_bare"] = ray.get(ray.remote(
                num_gpus=args.tp, resources={"inference": args.tp}, max_calls=1,
                runtime_env=placement.actor_env(one_spec))(bare_generate).remote(
                    runtime_config(one_spec), model, prompts, params))
        fleet = Fleet.start(spec, model)
        if not args.skip_generate:
            result["generate_actor"] = actor_generate(Fleet(one_spec, fleet.engines[:1], fleet.groups[:1]),
                                                      prompts, params)
            result["generate_actor_of_bare"] = round(
                result["generate_actor"]["tokens_per_s"] / result["generate_bare"]["tokens_per_s"], 3)
            print(json.dumps({k: result[k] for k in ("generate_bare", "generate_actor")}), flush=True)
        trainer = ray.remote(BenchTrainer).options(**placement.trainer_options(spec)).remote(args.shape)
        for k in sorted(args.engines):
            sub = Fleet(gpu_spec(args, model, k), fleet.engines[:k], fleet.groups[:k])
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


def add_command(sub, func) -> None:
    p = sub.add_parser("bench", help="measure push bandwidth vs the raw transport ceiling (and GPU throughput)")
    which = p.add_subparsers(dest="which", required=True)
    s = which.add_parser("sync", help="CPU: gloo push vs raw broadcast at several sizes (stand-in receivers)")
    s.add_argument("--sizes-mib", type=lambda v: [int(x) for x in v.split(",")], default=[16, 64, 256])
    s.add_argument("--engines", type=int, default=2)
    s.add_argument("--bucket-mib", type=int, default=32)
    s.add_argument("--repeat", type=int, default=3)
    s.add_argument("--json", help="also write the results here")
    g = which.add_parser("gpu", help="GPU host: real vLLM engines; ceiling, push, baseline, fan-out, generation")
    g.add_argument("--shape", choices=sorted(SHAPES), default="qwen2.5-7b")
    g.add_argument("--engines", type=lambda v: [int(x) for x in v.split(",")], default=[1, 2])
    g.add_argument("--tp", type=int, default=1)
    g.add_argument("--bucket-mib", type=int, default=1024)
    g.add_argument("--repeat", type=int, default=5)
    g.add_argument("--prompts", type=int, default=64)
    g.add_argument("--gen-tokens", type=int, default=256)
    g.add_argument("--workdir", default="/tmp/rollfleet-bench")
    g.add_argument("--profile", action="store_true", help="decompose the push: no-load push, bucket sizes")
    g.add_argument("--skip-generate", action="store_true", help="skip the actor vs bare vLLM generation check")
    g.add_argument("--skip-baseline", action="store_true", help="skip the per-tensor-RPC baseline")
    g.add_argument("--json", help="also write the results here")
    p.set_defaults(func=func)


def main(args) -> int:
    result = bench_sync(args) if args.which == "sync" else bench_gpu(args)
    if args.which == "sync":
        cols = ["size_mib", "tensors", "buckets", "engines", "ceiling_gbps", "push_gbps", "of_ceiling", "checksums_ok"]
        print(f"bench sync: {result['transport']}, torch {result['torch']}, ray {result['ray']}, "
              f"bucket {result['bucket_mib']} MiB; push vs raw broadcast of the same bytes, same group")
        print("  ".join(f"{c:>12}" for c in cols))
        for r in result["rows"]:
            print("  ".join(f"{str(r[c]):>12}" for c in cols))
    else:
        print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0
