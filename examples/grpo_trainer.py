"""A minimal GRPO trainer for rollfleet: copy this file, then change the problems, the reward and
the hyper-parameters. Every trainer rank runs `main(ctx)` (`job.entrypoint: grpo_trainer:main`);
the code reaches the cluster through `job.runtimeEnv.workingDir` or a derived image (README).

Per step: take this rank's groups (generated while the previous step trained, at most
`rollout.maxStaleness` versions old), score them, one clipped policy-gradient step with
group-normalised advantages and the engines' logprobs as the behaviour policy, then push the new
weights to every engine (`ctx.push`: every rank gathers, rank 0 sends).
"""

from __future__ import annotations

import torch

from rollfleet.runtime.rollout import Request

PROBLEMS = [(f"Question: what is {a} plus {b}? Answer:", str(a + b))
            for a, b in [(2, 3), (4, 5), (7, 1), (3, 3), (6, 2), (1, 8), (5, 4), (9, 0)]]
GROUP = 4  # samples per problem
SAMPLING = {"n": GROUP, "temperature": 1.0, "max_tokens": 24, "logprobs": True}
LR, CLIP = 1e-5, 0.2


def reward(text: str, answer: str) -> float:
    """1 when the first number in the completion is the answer."""
    words = [w.strip(".,!?") for w in text.split()]
    first = next((w for w in words if w.isdigit()), None)
    return 1.0 if first == answer else 0.0


def load_model(ctx):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(ctx.model_path, dtype=torch.float32).to(ctx.device)
    if ctx.world_size > 1:  # FSDP2: shard every decoder layer, then the root
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    return model


def loss_of(model, batch, device):
    """Clipped surrogate over the completion tokens, one forward pass for the whole batch."""
    rows, spans, advantages, behaviour = [], [], [], []
    for c in batch:
        rewards = torch.tensor([reward(s.text, c.tag) for s in c.samples])
        adv = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
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
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
    logp = logp.gather(-1, ids[:, 1:, None])[..., 0]
    terms = []
    for i, ((p, n), a) in enumerate(zip(spans, advantages)):
        ratio = torch.exp(logp[i, p - 1:p - 1 + n] - behaviour[i].to(device))
        terms.append(-torch.min(ratio * a, ratio.clamp(1 - CLIP, 1 + CLIP) * a).mean())
    return torch.stack(terms).mean(), float(sum(reward(s.text, c.tag) for c in batch for s in c.samples))


def main(ctx):
    torch.manual_seed(ctx.rank)
    model = load_model(ctx)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    mine = PROBLEMS[ctx.rank::ctx.world_size]
    ahead, steps = ctx.spec.rollout.max_staleness, ctx.spec.job.steps
    rollouts = ctx.rollouts()

    def submit():
        rollouts.submit([Request(prompt=q, params=SAMPLING, tag=answer) for q, answer in mine])

    for _ in range(min(1 + ahead, steps)):  # generation runs ahead of training by `ahead` steps
        submit()
    history = []
    for step in range(1, steps + 1):
        batch = rollouts.take(len(mine), version=ctx.version)  # none older than rollout.maxStaleness
        ctx.release()  # the colocated layout: the engine on this GPU sleeps while the rank trains
        loss, total = loss_of(model, batch, ctx.device)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        stats = ctx.push(model)
        if step + ahead < steps:
            submit()
        history.append(total / (len(batch) * GROUP))
        if ctx.rank == 0:
            print(f"step {step}: mean reward {history[-1]:.3f} on rank 0, push {stats.seconds * 1e3:.0f} ms "
                  f"(v{stats.version})", flush=True)
    rollouts.close()
    return {"rank": ctx.rank, "mean_reward": history, "version": ctx.version} if ctx.rank == 0 else None
