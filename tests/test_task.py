"""task.py: the toy task's reward and the verdict; and the noise that makes MARGIN a margin chance
cannot give: the untrained tiny model's mean reward per step, over 40 seeds, on the CPU stand-in's
own decoding (the engines' sampling)."""

from __future__ import annotations

import asyncio
import statistics

import pytest

from rollfleet import demo
from rollfleet.runtime import task, tiny
from rollfleet.runtime.rollout import sampling_params
from rollfleet.runtime.standin import StandinCore


def test_the_reward_is_the_share_of_even_token_ids():
    assert task.reward([2, 4, 6]) == 1.0 and task.reward([1, 2, 3, 4]) == 0.5 and task.reward([]) == 0.0


def test_at_chance_a_steps_mean_reward_varies_far_less_than_the_margin():
    core = StandinCore(demo.local_spec(), str(tiny.ensure()))
    loop = asyncio.new_event_loop()
    loop.run_until_complete(core.start())
    means = []
    for seed in range(40):  # 40 steps of the untrained policy, each with its own seeds (its data position)
        rewards = []
        for i, prompt in enumerate(task.PROMPTS):
            params = sampling_params(task.params(seed, i))
            ids = core.tokenizer(prompt)["input_ids"]
            out: dict = {}
            loop.run_until_complete(core.generate(f"{seed}-{i}", [(k, ids, params) for k in range(params["n"])],
                                                  "s", lambda k, o: out.__setitem__(k, o)))
            rewards += [task.reward(o["token_ids"]) for o in out.values()]
        means.append(statistics.fmean(rewards))
    loop.run_until_complete(core.shutdown())
    loop.close()
    sd = statistics.pstdev(means)
    assert abs(statistics.fmean(means) - 0.5) < 0.1  # chance
    difference = (sd**2 + sd**2 / 3) ** 0.5  # step 1's mean against the mean of the last 3 steps
    assert 6 * difference < task.MARGIN, f"sd {difference:.4f}: a rise of {task.MARGIN} is not 6 of them"


def _rows(rewards, spreads=None):
    return [{"step": k + 1, "reward": r, "reward_spread": 0.1 if spreads is None else spreads[k]}
            for k, r in enumerate(rewards)]


@pytest.mark.parametrize("rewards,spreads,ok,start", [
    ([0.5, 0.52, 0.6, 0.7, 0.75, 0.8], None, True, "learned"),
    ([0.5, 0.7, 0.9, 1.0, 1.0, 1.0], [0.1, 0.1, 0.05, 0, 0, 0], True, "learned"),  # converged: alike, reward 1
    ([0.5, 0.5, 0.4, 0.0, 0.0, 0.0], [0.1, 0.1, 0.05, 0, 0, 0], False, "collapsed"),
    ([0.5, 0.52, 0.48, 0.5, 0.51, 0.5], None, False, "did not learn"),
    ([0.5], None, False, "1 step(s) cannot show learning"),
])
def test_the_verdict_holds_for_any_number_of_steps(rewards, spreads, ok, start):
    got, why = task.verdict(_rows(rewards, spreads))
    assert got is ok and why.startswith(start), why
    if spreads and spreads[-1] == 0 and ok:
        assert why.endswith("converged")
