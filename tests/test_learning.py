"""The loop learns, in every layout: the built-in trainer on the toy task (task.py) raises the reward from
its first step's (the untrained policy's) by task.MARGIN, which chance does not give (test_task.py
measures the noise: a step's mean reward varies by about 0.037 over seeds; the margin, 0.25, is more than
6 of those). The runs (tests/loop_runs.py, shared with test_metrics.py) cover both layouts, maxStaleness
0, 1 and 2, each in-flight policy and trainer groups of one and two ranks (FSDP2): dedicated with 2 ranks,
abort, maxStaleness 1, with an engine SIGKILLed after step 6; colocated with 2 ranks, wait, maxStaleness
0; dedicated with 1 rank, keep, maxStaleness 2. A test double of a broken weight mapping on the engines
(tests/doubles/broken_mapping.py) makes the third run fail: the reward tracks the weights the engines
really serve. (Swapping two same-shaped tensors of the transformer body, e.g. a layer's gate and up
projections or two norms, was measured to learn anyway: this task's signal lives in the tied embedding,
so the double shifts the embedding's rows by one, a vocabulary off-by-one.) The demos with a killed job
resumed from its checkpoint are `make test-e2e` (test_launch.py)."""

from __future__ import annotations

import pytest

from loop_runs import KILLED, RUNS

pytestmark = pytest.mark.slow


def _of(loop_runs: dict, name: str):
    if isinstance(loop_runs[name], BaseException):
        raise loop_runs[name]
    return loop_runs[name]


def _setting(sets: list[str], key: str, default: str) -> str:
    return next((s.split("=", 1)[1] for s in sets if s.startswith(key + "=")), default)


@pytest.mark.parametrize("name", list(RUNS))
def test_the_reward_rises_by_more_than_chance_gives(loop_runs, name):
    rows, (ok, why) = _of(loop_runs, name)
    assert ok, f"{why}: {[r['reward'] for r in rows]}"
    assert all(r["checksums_ok"] and r["versions_stamped"] for r in rows)
    colocated, sets = RUNS[name]
    assert {r["policy"] for r in rows} == {_setting(sets, "sync.inflight", "")}
    bound = int(_setting(sets, "rollout.maxStaleness", "0"))
    assert max(r["staleness"] for r in rows) <= bound
    assert (max(r["staleness"] for r in rows) > 0) == (bound > 0)  # off-policy samples were really trained on
    assert [r["version"] for r in rows] == list(range(1, len(rows) + 1))
    if name == KILLED:  # every request of the run ended exactly once although an engine died under it
        requests = rows[-1]["requests"]
        assert requests["failed"] == 0 and requests["submitted"] == requests["completed"]


def test_a_vocabulary_off_by_one_on_the_engines_makes_the_same_run_fail(loop_runs):
    rows, (ok, why) = _of(loop_runs, "broken")
    assert not ok and ("did not learn" in why or "collapsed" in why), f"{why}: {[r['reward'] for r in rows]}"
    assert all(r["checksums_ok"] for r in rows)  # the bytes arrived intact: only the mapping is wrong
