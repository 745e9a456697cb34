"""bench/: the host-side benchmark code, run small on the CPU so that what runs on a GPU host is not
untested code. Speeds are printed by the benches, never asserted; here only what they count."""

from __future__ import annotations

import argparse
import json

import pytest

from rollfleet import demo
from rollfleet.bench import cpu, rollout
from rollfleet.runtime import tiny
from rollfleet.runtime.fleet import Fleet

pytestmark = pytest.mark.slow


def rollout_args(**kw) -> argparse.Namespace:
    base = dict(steps=2, prompts=3, samples=2, median_tokens=12, max_tokens=40, sigma=0.8, seed=0, inflight=4)
    return argparse.Namespace(**{**base, **kw})


def test_the_rollout_workload_is_long_tailed_and_fixed_by_its_seed():
    args = rollout_args(steps=3, prompts=64, samples=8, median_tokens=300, max_tokens=4096)
    plan = rollout.lengths(args)
    assert plan == rollout.lengths(args) and plan != rollout.lengths(rollout_args(**{**vars(args), "seed": 1}))
    flat = sorted(n for step in plan for n in step)
    assert len(flat) == 3 * 64 * 8 and 16 <= flat[0] and flat[-1] <= 4096
    assert 250 <= flat[len(flat) // 2] <= 350 and flat[-1] > 3 * flat[len(flat) // 2]  # median ~300, a long tail


def test_bench_sync_measures_a_push_against_the_raw_broadcast(capsys):
    result = cpu.bench_sync(argparse.Namespace(sizes_mib=[4], engines=2, bucket_mib=1, repeat=1))
    (row,) = result["rows"]
    assert row["checksums_ok"] is True and row["buckets"] >= 2 and row["engines"] == 2
    assert row["ceiling_gbps"] > 0 and row["push_gbps"] > 0
    cpu.print_sync(result)
    assert "push vs raw broadcast" in capsys.readouterr().out
    json.dumps(result)  # (it starts and stops its own local Ray: before the fleet below)


@pytest.fixture(scope="module")
def fleet():
    spec = demo.local_spec(["sync.timeoutSeconds=30", "timeouts.healthSeconds=30"])
    ray = demo.start_local_ray(spec)
    fleet = Fleet.start(spec, str(tiny.ensure()))
    yield fleet
    fleet.shutdown()
    ray.shutdown()


def test_the_batch_and_the_async_paths_generate_exactly_the_planned_tokens(fleet):
    args = rollout_args()
    plan = rollout.lengths(args)
    batch = rollout.batch_path(fleet, args, plan)
    async_ = rollout.async_path(fleet, args, plan)
    assert batch["tokens"] == async_["tokens"] == sum(map(sum, plan))  # ignore_eos: every length exactly


