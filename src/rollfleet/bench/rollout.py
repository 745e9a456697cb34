"""`rollfleet bench rollout` (a GPU host, vLLM): a long-tail GRPO workload through
* the batch path: one blocking `fleet.generate` per step (every step waits for its slowest sample),
* the async path: the rollout API with `--inflight` samples in flight, refilled as each finishes,
  across step boundaries (the engine never drains between steps),
* bare vLLM `AsyncLLM` on the same GPU with the same engine arguments and the same in-flight bound,
and, with a second GPU for the trainer, the cost of a push under each in-flight policy while the async
path runs. Response lengths are drawn from a log-normal with a fixed seed (one engine request per
sample, `ignore_eos`, so every path generates exactly the same tokens). Speed is written down, never
asserted (docs/benchmarks.md)."""

from __future__ import annotations

import asyncio
import json
import math
import random
import threading
import time
from pathlib import Path
from typing import Any


def lengths(args) -> list[list[int]]:
    """Per step, per sample: the response length (log-normal around --median-tokens, clipped)."""
    rng = random.Random(args.seed)
    mu = math.log(args.median_tokens)
    per_step = args.prompts * args.samples
    return [[max(16, min(args.max_tokens, int(rng.lognormvariate(mu, args.sigma)))) for _ in range(per_step)]
            for _ in range(args.steps)]


def requests(args, step: int, sizes: list[int]):
    from rollfleet.runtime.rollout import Request

    prompts = [f"Problem {step}-{i}: write out the numbers from one to a thousand." for i in range(args.prompts)]
    return [Request(prompt=prompts[k // args.samples], tag=(step, k),
                    params={"temperature": 1.0, "max_tokens": n, "ignore_eos": True, "seed": k})
            for k, n in enumerate(sizes)]


def batch_path(fleet, args, plan) -> dict[str, Any]:
    tokens, t0 = 0, time.perf_counter()
    for step, sizes in enumerate(plan):
        tokens += sum(len(s.token_ids) for c in fleet.generate(requests(args, step, sizes)) for s in c.samples)
    seconds = time.perf_counter() - t0
    return {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}


def async_path(fleet, args, plan, during=None) -> dict[str, Any]:
    """Every step's requests through one client bounded at --inflight samples; `during(stop)` runs
    alongside (the pushes) until generation is done."""
    limited = fleet.spec.model_copy(update={"rollout": fleet.spec.rollout.model_copy(update={"queue_size": args.inflight})})
    from rollfleet.runtime.fleet import Fleet

    client = Fleet(limited, fleet.engines, []).rollouts()
    tokens, errors = 0, []

    def produce():
        try:
            for step, sizes in enumerate(plan):
                for r in requests(args, step, sizes):
                    client.submit([r], timeout_s=3600)
        except BaseException as exc:
            errors.append(exc)

    stop = threading.Event()
    side = threading.Thread(target=during, args=(stop,)) if during else None
    t0 = time.perf_counter()
    producer = threading.Thread(target=produce)
    producer.start()
    if side:
        side.start()
    want = sum(len(s) for s in plan)
    got = 0
    while got < want:
        for c in client.results(timeout_s=600):
            got += 1
            tokens += sum(len(s.token_ids) for s in c.samples)
        if errors:
            raise errors[0]
        if got < want:
            time.sleep(0.01)
    seconds = time.perf_counter() - t0
    stop.set()
    producer.join()
    if side:
        side.join()
    client.close()
    return {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}


def bare(spec_json: dict[str, Any], model: str, args_json: dict[str, Any]) -> dict[str, Any]:
    """Bare vLLM AsyncLLM with the engine's exact arguments: `inflight` requests at a time, refilled."""
    import argparse

    from rollfleet.runtime.engine import VllmCore, vllm_sampling
    from rollfleet.runtime.rollout import sampling_params
    from rollfleet.spec import load_spec

    args = argparse.Namespace(**args_json)
    plan = lengths(args)

    async def run() -> dict[str, Any]:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        core = VllmCore(load_spec(spec_json), model)
        await core.start()
        tok = core.tokenizer
        gate = asyncio.Semaphore(args.inflight)
        tokens = 0

        async def one(i, prompt_ids, n):
            nonlocal tokens
            params = vllm_sampling(sampling_params({"temperature": 1.0, "max_tokens": n, "ignore_eos": True,
                                                    "seed": i}), 0)
            async with gate:
                final = None
                async for final in core.llm.generate({"prompt_token_ids": prompt_ids}, SamplingParams(
                        **params, output_kind=RequestOutputKind.FINAL_ONLY), f"bare-{i}"):
                    pass
                tokens += len(final.outputs[0].token_ids)

        t0 = time.perf_counter()
        jobs = []
        for step, sizes in enumerate(plan):
            for r in requests(args, step, sizes):
                jobs.append(one(len(jobs), tok(r.prompt)["input_ids"], r.params["max_tokens"]))
        await asyncio.gather(*jobs)
        seconds = time.perf_counter() - t0
        await core.shutdown()
        return {"tokens": tokens, "seconds": round(seconds, 2), "tokens_per_s": round(tokens / seconds, 1)}

    return asyncio.run(run())


def push_costs(fleet, args, plan, spec) -> dict[str, Any]:
    """A push every --push-every seconds from a trainer GPU while the async path runs, per policy."""
    import ray
    from ray.util.placement_group import remove_placement_group

    from rollfleet.runtime import placement

    groups = placement.reserve_trainers(spec, 600)
    options = {**placement.trainer_options(spec, groups[0], 0), "max_concurrency": 2}  # stop() beside loop()
    trainer = ray.remote(PushLoop).options(**options).remote(args.shape)
    out = {}
    try:
        ray.get(trainer.join.remote(fleet), timeout=600)
        for policy in ("wait", "abort", "keep"):
            box: dict[str, Any] = {}

            def pushes(stop, policy=policy, box=box):
                ref = trainer.loop.remote(policy, args.push_every, 3600)
                stop.wait()
                ray.get(trainer.stop.remote(), timeout=60)
                box["pushes"] = ray.get(ref, timeout=600)

            generation = async_path(fleet, args, plan, during=pushes)
            out[policy] = {"generation": generation, "pushes": box.get("pushes", [])}
            print(json.dumps({policy: out[policy]["generation"]}), flush=True)
    finally:
        ray.kill(trainer)
        for g in groups:
            remove_placement_group(g)
    return out


class PushLoop:
    """A trainer GPU pushing the model shape every `every` seconds until told to stop."""

    def __init__(self, shape: str):
        import torch

        from rollfleet.bench.gpu import synthetic_params

        self.device = torch.device("cuda", torch.cuda.current_device())
        self.params = synthetic_params(shape, torch.bfloat16, self.device)
        self.stopped = threading.Event()

    def join(self, fleet) -> None:
        self.sender = fleet.sender(self.device)

    def loop(self, policy: str, every: float, limit_s: float) -> list[dict[str, Any]]:
        self.stopped.clear()
        self.sender.inflight = policy
        rows, deadline = [], time.monotonic() + limit_s
        while not self.stopped.wait(every) and time.monotonic() < deadline:
            stats = self.sender.push(self.params, verify=False)
            rows.append({"push_s": round(stats.seconds, 4), "paused_s": round(stats.paused_seconds, 4),
                         "in_flight": sum(p["in_flight"] for p in stats.profile),
                         "aborted": sum(p["aborted"] for p in stats.profile)})
        return rows

    def stop(self) -> None:
        self.stopped.set()


def bench_rollout(args) -> dict[str, Any]:
    import ray
    import torch

    from rollfleet.bench.gpu import gpu_spec, model_dir
    from rollfleet.runtime.fleet import Fleet
    from rollfleet.spec import runtime_config

    gpus = torch.cuda.device_count()
    model = str(model_dir(args.shape, Path(args.workdir)))
    spec = gpu_spec(model, 1, 1, 1024, {"rollout": {"queueSize": 1 << 20}})
    spec = spec.model_copy(update={"vllm": spec.vllm.model_copy(update={"gpu_memory_utilization": 0.9,
                                                                          "max_num_seqs": args.inflight})})
    plan = lengths(args)
    ray.init(num_gpus=gpus, resources={"trainer": max(gpus - 1, 1), "inference": 1}, include_dashboard=False)
    result: dict[str, Any] = {"bench": "rollout", "shape": args.shape, "torch": torch.__version__,
                              "ray": ray.__version__, "steps": args.steps, "prompts": args.prompts,
                              "samples": args.samples, "inflight": args.inflight,
                              "tokens_planned": sum(map(sum, plan))}
    try:
        import vllm

        result["vllm"] = vllm.__version__
        result["bare"] = ray.get(ray.remote(num_gpus=1, resources={"inference": 1}, max_calls=1)(bare).remote(
            runtime_config(spec), model, vars(args)))
        print(json.dumps({"bare": result["bare"]}), flush=True)
        fleet = Fleet.start(spec, model)
        fleet.generate(requests(args, 99, [16] * 8))  # warm-up
        result["batch"] = batch_path(fleet, args, plan)
        result["async"] = async_path(fleet, args, plan)
        result["async_over_batch"] = round(result["async"]["tokens_per_s"] / result["batch"]["tokens_per_s"], 3)
        result["async_of_bare"] = round(result["async"]["tokens_per_s"] / result["bare"]["tokens_per_s"], 3)
        print(json.dumps({k: result[k] for k in ("batch", "async", "async_over_batch", "async_of_bare")}), flush=True)
        if gpus >= 2 and not args.skip_push:
            result["push"] = push_costs(fleet, args, plan, spec)
        else:
            result["push"] = f"not measured: a push needs a trainer GPU besides the engine's ({gpus} GPU here)"
        return result
    finally:
        ray.shutdown()
