"""The loop learns: the built-in trainer on the toy task (task.py) raises the reward from its first
step's (the untrained policy's) by task.MARGIN, which chance does not give (test_task.py measures the
noise). With the two demo runs (test_launch.py: dedicated, 2 ranks, abort, maxStaleness 1; colocated,
2 ranks, wait, maxStaleness 0; each with an engine killed) the case here (dedicated, 1 rank, keep,
maxStaleness 2) covers both layouts, maxStaleness 0, 1 and 2, each in-flight policy, one trainer rank
and two (FSDP2). A test double of a broken weight mapping on the engines
(tests/doubles/broken_mapping.py) makes the same run fail: the reward tracks the
weights the engines really serve. (Swapping two same-shaped tensors of the transformer body, e.g. a
layer's gate and up projections or two norms, was measured to learn anyway: this task's signal lives in
the tied embedding, so the double shifts the embedding's rows by one, a vocabulary off-by-one.)"""

from __future__ import annotations

import pytest

from rollfleet import demo
from rollfleet.runtime import launch, tiny, trainer

from conftest import ROOT

pytestmark = [pytest.mark.slow, pytest.mark.e2e]  # `make test-e2e`: too long for the CI budget

STEPS = 20
CASES = {  # name: (colocated, --set overrides)
    "dedicated-1-rank-keep-staleness-2": (False, ["sync.inflight=keep", "rollout.maxStaleness=2",
                                                  "pools.trainer.gpusPerNode=1"]),
}
DOUBLE = {"env_vars": {"PYTHONPATH": str(ROOT / "tests" / "doubles"),
                       "ROLLFLEET_TEST_SHIFT": "model.embed_tokens.weight"},
          "worker_process_setup_hook": "broken_mapping.install"}


def run(colocated: bool, sets: list[str]) -> tuple[list[dict], tuple[bool, str]]:
    """The rows of one run and its verdict."""
    spec = demo.local_spec([f"job.steps={STEPS}", *sets], colocated=colocated)
    rows: list[dict] = []
    launch.run(spec, str(tiny.ensure()), on_rows=rows.extend)
    assert len(rows) == STEPS
    return rows, trainer.verdict(rows, spec.rollout.max_staleness)


@pytest.fixture(scope="module")
def ray_local():
    ray = demo.start_local_ray(demo.local_spec(), extra_cpus=2)
    yield ray
    ray.shutdown()


@pytest.mark.parametrize("case", list(CASES))
def test_the_reward_rises_by_more_than_chance_gives(ray_local, case):
    rows, (ok, why) = run(*CASES[case])
    assert ok, f"{why}: {[r['reward'] for r in rows]}"
    assert all(r["checksums_ok"] and r["versions_stamped"] for r in rows)


def test_a_vocabulary_off_by_one_on_the_engines_makes_the_same_run_fail(ray_local):
    ray_local.shutdown()  # the double is installed in every worker of a Ray of its own
    demo.start_local_ray(demo.local_spec(), extra_cpus=2, runtime_env=DOUBLE)
    try:
        rows, (ok, why) = run(False, ["sync.inflight=keep", "rollout.maxStaleness=1"])
        assert not ok and ("did not learn" in why or "collapsed" in why), f"{why}: {[r['reward'] for r in rows]}"
        assert all(r["checksums_ok"] for r in rows)  # the bytes arrived intact: only the mapping is wrong
    finally:
        ray_local.shutdown()  # the last test of the module: the fixture's shutdown then finds none
