"""The built-in GRPO trainer (`job.entrypoint` unset), run as `grpo(ctx)` on every trainer rank.

It is the loop a researcher's trainer follows, small enough to read (a copyable version is
examples/grpo_trainer.py), not a recipe: the reward is a toy (share of completion tokens with an
even id), so that every step changes the weights.

* The model is sharded with FSDP2 (`fully_shard` per decoder layer, then the root) over every rank;
  gradients are averaged across ranks; `ctx.push(model)` gathers it and rank 0 streams it.
* Colocated layout: `ctx.release()` puts the engine on this rank's GPU to sleep before the optimizer
  step; the push wakes it (rollout.maxStaleness is 0 there, so nothing is in flight meanwhile).
* Asynchronous: the prompts of step k + 1 + rollout.maxStaleness are submitted right after push k,
  so generation runs while steps train; `take(version=...)` guarantees no group is older than
  rollout.maxStaleness versions. Each rank generates and trains its own share of the prompts.
* Rank 0 reports one row per step as it ends (the launcher prints it).
"""

from __future__ import annotations

import time
from typing import Any

from rollfleet.runtime.rollout import Request

PROMPTS = ["The answer to the question is", "hello world, the model says", "One two three four",
           "What is the color of the tree?", "red green blue", "the cat and the dog", "Five six seven",
           "Where is the house?"]
SAMPLES = 4  # GRPO group size per prompt
MAX_TOKENS = 16
CHECK = {"temperature": 0.0, "max_tokens": 8}  # greedy outputs after each push must change
COLUMNS = ["step", "version", "policy", "staleness", "queue", "tokens_per_s", "push_ms", "paused_ms",
           "checksums_ok", "outputs_changed", "versions_stamped", "loss"]


def load_model(ctx):
    """The policy on this rank's device, sharded over the trainer group when it has several ranks."""
    import torch
    from transformers import AutoModelForCausalLM

    spec = ctx.spec
    dtype = getattr(torch, spec.model.dtype) if spec.model.dtype != "auto" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(ctx.model_path, revision=spec.model.revision,
                                                 dtype=dtype).to(ctx.device)
    if ctx.world_size > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    return model


def grpo_loss(model, batch, device, pad_id: int):
    """Group-normalised advantages × the completions' log-probability given their prompts, in ONE
    forward and backward pass (FSDP ranks must issue the same collectives)."""
    import torch

    seqs, spans, advantages = [], [], []
    for c in batch:
        rewards = torch.tensor([sum(t % 2 == 0 for t in s.token_ids) / len(s.token_ids) for s in c.samples])
        adv = (rewards - rewards.mean()) / (rewards.std() + 1e-6) if len(c.samples) > 1 else rewards * 0
        for a, s in zip(adv.tolist(), c.samples):
            seqs.append(c.prompt_token_ids + s.token_ids)
            spans.append((len(c.prompt_token_ids), len(s.token_ids)))
            advantages.append(a)
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, device=device)
    mask = torch.zeros((len(seqs), width), dtype=torch.long, device=device)
    for i, seq in enumerate(seqs):
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
    logp = logp.gather(-1, ids[:, 1:, None])[..., 0]
    terms = [-a * logp[i, p - 1:p - 1 + n].mean() for i, (a, (p, n)) in enumerate(zip(advantages, spans))]
    return torch.stack(terms).mean()


def grpo(ctx) -> list[dict[str, Any]] | None:
    import torch

    spec = ctx.spec
    torch.manual_seed(0)
    model = load_model(ctx)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    mine = PROMPTS[ctx.rank::ctx.world_size]
    ahead, steps = spec.rollout.max_staleness, spec.job.steps
    rollouts = ctx.rollouts()

    def submit(step: int) -> None:
        rollouts.submit([Request(prompt=p, tag=(step, i), params={
            "n": SAMPLES, "temperature": 1.0, "max_tokens": MAX_TOKENS, "seed": step * 1000 + i})
            for i, p in enumerate(mine)])

    for step in range(1, min(1 + ahead, steps) + 1):
        submit(step)
    check = PROMPTS[:2]
    previous = [s.token_ids for c in ctx.generate(check, CHECK) for s in c.samples] if ctx.rank == 0 else None
    pad = 0  # any token id: padded positions are masked out
    rows = []
    t_last = time.perf_counter()
    try:
        for step in range(1, steps + 1):
            batch = rollouts.take(len(mine), version=ctx.version)
            now = time.perf_counter()
            tokens = sum(len(s.token_ids) for c in batch for s in c.samples)
            staleness = max(c.staleness(ctx.version) for c in batch)
            ctx.release()  # colocated: the engine on this GPU sleeps while the rank trains
            loss = grpo_loss(model, batch, ctx.device, pad)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            stats = ctx.push(model)
            if step + 1 + ahead <= steps:
                submit(step + 1 + ahead)
            if ctx.rank != 0:
                continue
            after = ctx.generate(check, CHECK)
            ids = [s.token_ids for c in after for s in c.samples]
            row = {"step": step, "version": stats.version, "policy": spec.sync.inflight, "staleness": staleness,
                   "queue": rollouts.outstanding, "tokens_per_s": round(tokens / (now - t_last), 1),
                   "push_ms": round(stats.seconds * 1e3, 1), "paused_ms": round(stats.paused_seconds * 1e3, 1),
                   "checksums_ok": stats.checksums_ok, "outputs_changed": ids != previous,
                   "versions_stamped": all(s.admitted_version == s.completed_version == stats.version
                                           for c in after for s in c.samples),
                   "loss": round(float(loss.detach()), 4)}
            previous, t_last = ids, now
            ctx.report(row)
            rows.append(row)
    finally:
        rollouts.close()
    return rows if ctx.rank == 0 else None


def table_header() -> str:
    return "  ".join(f"{c:>{max(len(c), 8)}}" for c in COLUMNS)


def table_row(row: dict[str, Any]) -> str:
    return "  ".join(f"{str(row[c]):>{max(len(c), 8)}}" for c in COLUMNS)


def passed(rows: list[dict[str, Any]], max_staleness: int) -> bool:
    return bool(rows) and all(r["checksums_ok"] is not False and r["outputs_changed"] and r["versions_stamped"]
                              and r["staleness"] <= max_staleness for r in rows)
