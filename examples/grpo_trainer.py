"""A minimal GRPO trainer for rollfleet: copy this file, then change the prompts, the reward and the
hyper-parameters. Every trainer rank runs `main(ctx)` (`job.entrypoint: grpo_trainer:main`); the code
reaches the cluster through `job.runtimeEnv.workingDir` or a derived image (README).

The task is the built-in trainer's toy one, which a tiny model learns in a few dozen steps: the reward
of a completion is the share of its tokens whose id is even (chance is about 0.5). Replace `reward`
with your verifier (it gets the Sample: token ids, text; and the request's tag, e.g. the answer).

Per step: take this rank's groups (generated while the previous step trained, at most
`rollout.maxStaleness` versions old), score them, one clipped policy-gradient step with
group-normalised advantages and the engines' logprobs as the behaviour policy, then push the new
weights to every engine (`ctx.push`: every rank gathers, rank 0 sends; sent again after an engine
fault). Rank 0 prints the mean reward, its spread within groups and the mean log-ratio to the starting
policy (a KL estimate) per step.
"""

from __future__ import annotations

import statistics

import torch

from rollfleet.runtime.rollout import Request

PROMPTS = ["The answer to the question is", "hello world, the model says", "One two three four",
           "What is the color of the tree?", "red green blue", "the cat and the dog", "Five six seven",
           "Where is the house?"]
GROUP = 4  # samples per prompt
SAMPLING = {"n": GROUP, "temperature": 1.0, "max_tokens": 16, "logprobs": True}
LR, CLIP = 1e-2, 0.2


def reward(sample, tag) -> float:
    """The share of even token ids in the completion."""
    return sum(t % 2 == 0 for t in sample.token_ids) / max(len(sample.token_ids), 1)


def load_model(ctx):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ctx.model_path, dtype=torch.float32).to(ctx.device)
    if ctx.world_size > 1:  # FSDP2: shard every decoder layer, then the root
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    return model


def logprobs_of(model, ids, mask):
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
    return logp.gather(-1, ids[:, 1:, None])[..., 0]


def loss_of(model, reference, batch, device):
    """Clipped surrogate over the completion tokens (one forward pass for the whole batch), the
    rewards, and the mean log-ratio to the reference (starting) policy."""
    rows, spans, advantages, behaviour, rewards = [], [], [], [], []
    for c in batch:
        r = torch.tensor([reward(s, c.tag) for s in c.samples])
        rewards.append(r.tolist())
        adv = (r - r.mean()) / (r.std() + 1e-6)
        for a, s in zip(adv.tolist(), c.samples):
            rows.append(c.prompt_token_ids + s.token_ids)
            spans.append((len(c.prompt_token_ids), len(s.token_ids)))
            advantages.append(a)
            behaviour.append(torch.tensor(s.logprobs))
    width = max(map(len, rows))
    ids = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    mask = torch.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row)
        mask[i, :len(row)] = 1
    logp = logprobs_of(model, ids, mask)
    with torch.no_grad():
        ref = logprobs_of(reference, ids, mask)
    terms, ratios = [], []
    for i, ((p, n), a) in enumerate(zip(spans, advantages)):
        mine = logp[i, p - 1:p - 1 + n]
        ratio = torch.exp(mine - behaviour[i].to(device))
        terms.append(-torch.min(ratio * a, ratio.clamp(1 - CLIP, 1 + CLIP) * a).mean())
        ratios.append(float((mine.detach() - ref[i, p - 1:p - 1 + n]).mean()))
    return torch.stack(terms).mean(), rewards, statistics.fmean(ratios)


def main(ctx):
    torch.manual_seed(ctx.rank)
    model = load_model(ctx)
    reference = load_model(ctx).eval()  # the starting policy
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    mine = PROMPTS[ctx.rank::ctx.world_size]
    ahead, steps = ctx.spec.rollout.max_staleness, ctx.spec.job.steps
    rollouts = ctx.rollouts()

    def submit():
        rollouts.submit([Request(prompt=q, params=SAMPLING) for q in mine])

    for _ in range(min(1 + ahead, steps)):  # generation runs ahead of training by `ahead` steps
        submit()
    history = []
    for step in range(1, steps + 1):
        batch = rollouts.take(len(mine), version=ctx.version)  # none older than rollout.maxStaleness
        ctx.release()  # the colocated layout: the engine on this GPU sleeps while the rank trains
        loss, rewards, kl = loss_of(model, reference, batch, ctx.device)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        stats = ctx.push(model)
        if step + ahead < steps:
            submit()
        mean = statistics.fmean(r for group in rewards for r in group)
        spread = statistics.fmean(statistics.pstdev(group) for group in rewards)
        history.append(mean)
        if ctx.rank == 0:
            print(f"step {step}: reward {mean:.3f} (spread {spread:.3f}) kl {kl:.3f} on rank 0, push "
                  f"{stats.seconds * 1e3:.0f} ms (v{stats.version})", flush=True)
    rollouts.close()
    return {"rank": ctx.rank, "mean_reward": history, "version": ctx.version} if ctx.rank == 0 else None
