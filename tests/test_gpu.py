"""Real vLLM engines on real GPUs (marker `gpu`; skipped where CUDA or vLLM is absent).

1. The built-in GRPO trainer on the production path (TrainerGroup.start, Fleet.start: AsyncLLM engine
   actors with the worker extension; colocated: in the ranks' bundles, sleep mode on), 20 steps of the
   toy task: the reward must rise (trainer.verdict), checksums agree, samples carry the pushed version.
   Then a probe that pushes twice and compares the engines' parameters with the trainer's.
2. The same colocated loop with the engine's process SIGKILLed after step 5: every step completes, the
   supervisor restarts the engine on the GPU and a push re-admits it; detect / restart / re-sync times.
3. `sync.inflight: keep` on one real engine: pushes land while greedy requests generate, and every
   delivered token is regenerated from the weights of the version it is stamped with (the same engine,
   pushed back to each version): vLLM's abort hands back exactly the tokens it had, and the new weights
   and a reset prefix cache are in before a single token more is decoded.
4. Metrics (with 1): Ray's metrics endpoint on this node, read every 2 s during the colocated run, has
   every rollfleet_* metric and the vLLM names the stand-in records, from real vLLM's Ray stat logger.
Needs: 1 GPU for 1-3, 2 for the dedicated cases of 1 (3 for fan-out / TP=2). Results go to $OUT (json).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import threading
import time
import urllib.request
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA GPUs"),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM"),
]

OUT = Path(os.environ.get("OUT", "gpu-results"))
STEPS = 20
CHECKED = ["model.norm.weight", "model.layers.0.input_layernorm.weight", "model.layers.1.post_attention_layernorm.weight"]
PROBE = '''
import torch
from rollfleet.bench.workers import param_sums
from rollfleet.runtime.push import full_tensors

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


def _save(name: str, data) -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / name).write_text(json.dumps(data, indent=1, default=str))


@pytest.fixture(scope="module")
def ray_gpus(tmp_path_factory):
    import ray

    work = tmp_path_factory.mktemp("gpu-probe")
    (work / "gpu_probe.py").write_text(PROBE)
    n = torch.cuda.device_count()
    os.environ["RAY_metrics_report_interval_ms"] = "1000"  # processes hand metrics to the agent every 1 s
    ray.init(num_gpus=n, resources={"trainer": n, "inference": n}, include_dashboard=False,
             runtime_env={"working_dir": str(work)})
    yield n
    ray.shutdown()


def gpu_spec(layout: str, engines: int = 1, tp: int = 1, inflight: str = "wait", steps: int = STEPS,
             max_len: int = 256):
    from rollfleet.runtime import tiny
    from rollfleet.spec import load_spec

    common = {
        "name": "gpu-test", "engine": "vllm",
        "model": {"name": tiny.TINY_MODEL, "dtype": "bfloat16", "maxModelLen": max_len},
        "sync": {"bucketMiB": 1, "timeoutSeconds": 300, "inflight": inflight},  # 1 MiB: many buckets
        "timeouts": {"initSeconds": 900, "healthSeconds": 300}, "job": {"steps": steps},
        "recovery": {"probeSeconds": 2, "probeTimeoutSeconds": 10},
    }
    if layout == "colocated":
        return load_spec({**common, "pools": {"colocated": {"gpusPerNode": engines, "gpuProduct": None}},
                          "vllm": {"enforceEager": True, "gpuMemoryUtilization": 0.3},
                          "rollout": {"maxStaleness": 0}})
    return load_spec({**common, "pools": {"trainer": {"gpusPerNode": 1, "gpuProduct": None},
                                          "inference": {"gpusPerNode": engines * tp, "gpuProduct": None}},
                      "vllm": {"tensorParallelSize": tp, "enforceEager": True, "gpuMemoryUtilization": 0.3}})


class Scrape(threading.Thread):
    """Reads Ray's metrics endpoint on this node every 2 s (as Prometheus would): the names seen."""

    def __init__(self):
        import ray

        super().__init__(daemon=True)
        node = next(n for n in ray.nodes() if n["Alive"])
        self.url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"
        self.names: set[str] = set()
        self.text, self.errors, self.done = "", [], threading.Event()

    def run(self):
        while not self.done.wait(2):
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    self.text = r.read().decode()
                self.names |= set(re.findall(r"^(ray_(?:rollfleet|vllm)_[a-z0-9_]+)", self.text, re.M))
                OUT.mkdir(parents=True, exist_ok=True)
                (OUT / "gpu-metrics-names.txt").write_text("\n".join(sorted(self.names)) + "\n")  # as it goes
            except OSError as exc:
                self.errors.append(f"{type(exc).__name__}: {exc}")

    def stop(self):
        self.done.set()
        self.join(timeout=10)
        return self


CASES = {  # id: (layout, engines, tp, inflight, GPUs needed)
    "colocated-tp1": ("colocated", 1, 1, "wait", 1),
    "1engine-tp1-wait": ("dedicated", 1, 1, "wait", 2),
    "1engine-tp1-abort": ("dedicated", 1, 1, "abort", 2),
    "1engine-tp1-keep": ("dedicated", 1, 1, "keep", 2),
    "2engines-tp1": ("dedicated", 2, 1, "wait", 3),
    "1engine-tp2": ("dedicated", 1, 2, "wait", 3),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_the_grpo_loop_learns_and_the_pushes_land_on_real_engines(ray_gpus, case):
    from rollfleet.runtime import tiny, trainer
    from rollfleet.runtime.fleet import Fleet
    from rollfleet.runtime.trainer_group import BUILTIN, TrainerGroup

    layout, engines, tp, inflight, need = case
    if need > ray_gpus:
        pytest.skip(f"needs {need} GPUs, this host has {ray_gpus}")
    spec = gpu_spec(layout, engines, tp, inflight)
    scrape = Scrape()
    scrape.start()
    group = TrainerGroup.start(spec)
    fleet = Fleet.start(spec, str(tiny.ensure()), trainers=group)
    try:
        t0 = time.monotonic()
        rows = group.run(fleet, BUILTIN, on_report=lambda r: print(trainer.table_row(r), flush=True), timeout_s=900)
        ok, why = trainer.verdict(rows, spec.rollout.max_staleness)
        _save(f"gpu-learning-{layout}-{inflight}.json", {"verdict": why, "seconds": time.monotonic() - t0,
                                                          "gpu": torch.cuda.get_device_name(0), "rows": rows})
        print(why)
        assert ok, why
        assert all(r["checksums_ok"] is True for r in rows) and len(rows) == spec.job.steps
        out = group.run(fleet, "gpu_probe:pushes_match", timeout_s=600)
        assert [v[1] for v in out["versions"]] == [True, True]
        for engine, workers in enumerate(out["engines"]):
            assert len(workers) == tp
            for sums in workers:  # replicated parameters: the same on every TP rank as on the trainer
                assert sums == pytest.approx(out["want"], rel=1e-6), f"engine {engine}: {sums} != {out['want']}"
        assert all(h["state"] == "idle" for h in fleet.health())
        if layout == "colocated":
            _check_metrics(scrape.stop())
    finally:
        scrape.stop()
        fleet.shutdown()
        group.shutdown()


# vLLM's counters reach Ray's endpoint at their first increment: the toy task's prompts are shorter than
# a KV-cache block (16 tokens), so nothing ever hits the prefix cache (its queries are counted)
NEVER_INCREMENTED = {"vllm_prefix_cache_hits"}


def _check_metrics(scrape: Scrape) -> None:
    from rollfleet.runtime import metrics

    want = {n: metrics.exported(n) for n in [*metrics.METRICS, *metrics.VLLM] if n not in NEVER_INCREMENTED}
    missing = sorted(n for n, exported in want.items() if exported not in scrape.names)
    _save("gpu-metrics.json", {"url": scrape.url, "errors": scrape.errors[-5:], "missing": missing,
                               "names": sorted(scrape.names), "gpu": torch.cuda.get_device_name(0)})
    (OUT / "gpu-metrics.txt").write_text(scrape.text)
    print(f"metrics endpoint {scrape.url}: {len(scrape.names)} ray_rollfleet_/ray_vllm_ names, missing {missing}")
    assert scrape.names, f"nothing from {scrape.url}: {scrape.errors[-3:]}"
    assert not missing, f"not on Ray's metrics endpoint: {missing}"


def test_a_killed_engine_process_is_restarted_on_its_gpu_and_the_colocated_run_completes(ray_gpus):
    from rollfleet.runtime import launch, tiny
    from rollfleet.runtime.fleet import Fleet
    from rollfleet.runtime.trainer_group import BUILTIN, TrainerGroup

    spec = gpu_spec("colocated", steps=10)
    group = TrainerGroup.start(spec)
    fleet = Fleet.start(spec, str(tiny.ensure()), trainers=group)
    faults = []

    def on_report(row):
        print(row["step"], row["version"], row["reward"], row["resent"], flush=True)
        if row["step"] == 5 and not faults:
            faults.append(launch.kill_engine(fleet, 0))

    try:
        rows = group.run(fleet, BUILTIN, on_report=on_report, timeout_s=900)
        events = fleet.events()
        summary = launch.recovery_summary(events, faults[0])
        _save("gpu-recovery-colocated.json", {"summary": summary, "events": events, "fault": faults[0],
                                               "gpu": torch.cuda.get_device_name(0), "rows": rows})
        print(summary)
        assert [r["step"] for r in rows] == list(range(1, 11)) and all(r["checksums_ok"] for r in rows)
        assert rows[-1]["requests"]["failed"] == 0
        assert "restarted and loaded in" in summary and "serving again" in summary, summary
        assert all(r["versions_stamped"] for r in rows[5:])  # the replaced engine serves the pushed weights
    finally:
        fleet.shutdown()
        group.shutdown()


def test_keep_on_real_vllm_every_token_comes_from_the_weights_its_version_names(ray_gpus):
    """One engine as a Ray actor on the GPU, weights handed over by CUDA IPC from this process (the
    colocated handoff); greedy decoding on weights whose logits are scaled up (argmax far from ties)."""
    import ray

    from rollfleet.runtime import tiny
    from rollfleet.runtime.engine import EngineActor, continued
    from rollfleet.runtime.fleet import Fleet
    from rollfleet.runtime.ipc import IpcSender
    from rollfleet.runtime.rollout import Request
    from rollfleet.spec import runtime_config
    from transformers import AutoModelForCausalLM

    spec = gpu_spec("dedicated", inflight="keep", max_len=512)  # the tiny model has 512 positions
    engine = ray.remote(EngineActor).options(num_gpus=1, resources={"inference": 1}, max_concurrency=32,
                                             runtime_env={"env_vars": {**spec.env, **spec.nccl_env}}).remote(
        runtime_config(spec), 0, str(tiny.ensure()))
    ray.get(engine.start.remote(), timeout=900)
    fleet = Fleet(spec, [engine], [])  # unsupervised: this test is about one engine's ordering
    sender = IpcSender(fleet, 0, "cuda:0")
    base = AutoModelForCausalLM.from_pretrained(str(tiny.ensure()), dtype=torch.bfloat16).to("cuda:0")

    def weights(seed):
        g = torch.Generator(device="cuda:0").manual_seed(seed)
        out = {}
        for n, p in base.named_parameters():
            t = p.detach() + 0.05 * torch.randn(p.shape, generator=g, device="cuda:0", dtype=p.dtype)
            out[n] = t * 30 if n == "model.norm.weight" else t  # large logit gaps: greedy is robust to batching
        return out

    table = {}  # version -> seed of its weights

    def push(seed):
        stats = sender.push(list(weights(seed).items()))
        table[stats.version] = seed
        return stats

    greedy = {"temperature": 0.0, "max_tokens": 450, "ignore_eos": True, "n": 2}  # long enough to span a push
    prompts = ["The answer to the question is", "red green blue", "the cat and the dog", "Where is the house?"]
    try:
        push(1)
        with fleet.rollouts() as client:
            client.submit([Request(prompt=p, params=greedy, tag=p) for p in prompts])
            time.sleep(0.4)  # the requests decode
            pushed = push(2)  # keep: interrupted, loaded, reset, continued on the new weights
            got = list(client.results(300))
        assert pushed.profile[0]["interrupted"] > 0, pushed.profile
        spans = [s for c in got for s in c.samples if s.spans_update]
        assert spans, "no sample spans the push"
        mismatches, checked = [], 0
        for version, seed in sorted(table.items()):  # regenerate each stretch on its own version's weights
            push(seed)
            with fleet.rollouts() as client:
                for c in got:
                    for s in c.samples:
                        for k, (start, v) in enumerate(s.versions):
                            if v != version:
                                continue
                            end = s.versions[k + 1][0] if k + 1 < len(s.versions) else len(s.token_ids)
                            params = {**continued({**greedy, "min_tokens": 0}, start), "n": 1}
                            (r,) = client.generate([Request(prompt_token_ids=c.prompt_token_ids + s.token_ids[:start],
                                                            params=params)])
                            want, ref = s.token_ids[start:end], r.samples[0].token_ids[:end - start]
                            checked += len(want)
                            if ref != want:
                                mismatches.append({"request": c.tag, "sample": s.index, "stretch": [start, end],
                                                   "version": v, "first_diff": next(
                                                       i for i, (a, b) in enumerate(zip(ref, want)) if a != b)})
        _save("gpu-keep-ordering.json", {"tokens_checked": checked, "samples_spanning_the_push": len(spans),
                                         "switch_points": [s.versions[1][0] for s in spans],
                                         "mismatches": mismatches, "gpu": torch.cuda.get_device_name(0)})
        assert mismatches == [], mismatches
    finally:
        ray.get(engine.stop.remote(), timeout=120)
        ray.kill(engine)
