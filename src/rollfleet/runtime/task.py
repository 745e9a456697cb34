"""The built-in trainer's toy task: verifiable, and learnable by the tiny model in a few dozen steps on
a CPU. A completion's reward is the share of its tokens whose id is even, an exact rule on the tokens
the engines generated: an untrained policy scores about 0.5 (chance), one that learned it near 1.

`verdict` judges a run from its rows: the mean reward of a step (over every trainer rank: 8 prompts ×
8 samples of 16 tokens) must rise from step 1's (the untrained policy's) by MARGIN, to the mean of the
last 3 steps. At chance that difference has a standard deviation of about 0.037 (tests/test_task.py
measures a step's over 40 seeds), so a rise of 0.25 is more than 6 of them: chance does not give it.
"""

from __future__ import annotations

import statistics
from typing import Any

PROMPTS = ["The answer to the question is", "hello world, the model says", "One two three four",
           "What is the color of the tree?", "red green blue", "the cat and the dog", "Five six seven",
           "Where is the house?"]
SAMPLES = 8  # GRPO group size per prompt
MAX_TOKENS = 16
MARGIN = 0.25  # the rise over the untrained policy's reward that counts as learning
CONVERGED = 0.95  # a mean reward at or above this, with every group's samples alike, is a converged policy


def reward(token_ids: list[int]) -> float:
    """The share of even token ids: 1.0 for a completion made only of them."""
    return sum(t % 2 == 0 for t in token_ids) / len(token_ids) if token_ids else 0.0


def params(step: int, prompt: int) -> dict[str, Any]:
    """The sampling params of one prompt at one step (its seed is the data position: reproducible)."""
    return {"n": SAMPLES, "temperature": 1.0, "max_tokens": MAX_TOKENS, "seed": step * 1000 + prompt,
            "logprobs": True}


def rewards_of(batch) -> list[list[float]]:
    """Per completion, its samples' rewards."""
    return [[reward(s.token_ids) for s in c.samples] for c in batch]


def verdict(rows: list[dict[str, Any]]) -> tuple[bool, str]:
    """PASS when the reward rose by MARGIN from step 1 (the untrained policy: no push precedes its
    rollouts) to the mean of the last steps; a converged policy (reward ≥ CONVERGED, every group alike)
    is a pass, a collapsed one (every group alike, reward not risen) is named as such."""
    if len(rows) < 2:
        return False, f"{len(rows)} step(s) cannot show learning: run at least 8 (job.steps)"
    last = rows[-max(1, min(3, len(rows) // 3)):]
    baseline, final = rows[0]["reward"], statistics.fmean(r["reward"] for r in last)
    alike = all(r["reward_spread"] == 0 for r in last)
    rise = f"reward {baseline:.3f} at step 1 → {final:.3f} over the last {len(last)} step(s)"
    if final - baseline >= MARGIN:
        return True, f"learned: {rise} (+{final - baseline:.3f} ≥ {MARGIN})" + (
            "; converged" if alike and final >= CONVERGED else "")
    if alike:
        return False, f"collapsed: every group's samples are alike, {rise} (needs +{MARGIN})"
    return False, f"did not learn: {rise} (needs +{MARGIN}; {len(rows)} steps may be too few)"
