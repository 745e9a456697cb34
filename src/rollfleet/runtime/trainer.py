"""The built-in GRPO trainer (`job.entrypoint` unset), run as `grpo(ctx)` on every trainer rank.

It is the loop a researcher's trainer follows, small enough to read (a copyable version is
examples/grpo_trainer.py), on a toy task it can learn (task.py: the share of even token ids), so
that a run shows whether the loop is right: the reward must rise.

* The model is sharded with FSDP2 (`fully_shard` per decoder layer, then the root) over every rank;
  gradients are averaged across ranks; `ctx.push(model)` gathers it and rank 0 streams it.
* The loss is GRPO's clipped surrogate: group-normalised advantages, the engines' logprobs of the
  sampled tokens as the behaviour policy (they come from the weights that produced each token).
  Each step also reports the mean log-ratio to the starting policy on the sampled tokens (a KL estimate).
* Colocated layout: `ctx.release()` puts the engine on this rank's GPU to sleep before the optimizer
  step; the push wakes it (rollout.maxStaleness is 0 there, so nothing is in flight meanwhile).
* Asynchronous: the prompts of step k + 1 + rollout.maxStaleness are submitted right after push k,
  so generation runs while steps train; `take(version=...)` guarantees no group is older than
  rollout.maxStaleness versions. Each rank generates and trains its own share of the prompts.
* Checkpoints (job.checkpoint.path): every `everySteps` steps and at the end; a restarted job resumes
  from the newest one with the same step, version and data position, and pushes those weights first.
* Rank 0 reports one row per step as it ends (the launcher prints it).
"""

from __future__ import annotations

import statistics
import time
from typing import Any

from rollfleet.runtime import checkpoint, task
from rollfleet.runtime.rollout import Request

LR, CLIP = 1e-2, 0.2
CHECK = {"temperature": 0.0, "max_tokens": 8}  # greedy outputs after each push, stamped with its version
COLUMNS = ["step", "version", "policy", "staleness", "reward", "reward_spread", "kl", "loss", "tokens_per_s",
           "push_ms", "paused_ms", "queue", "resent", "checksums_ok", "outputs_changed", "versions_stamped"]


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


def _batch_tensors(batch, device, pad_id: int):
    """Prompt + completion rows of every sample, padded; the completion spans; the samples in order."""
    import torch

    seqs, spans, samples = [], [], []
    for c in batch:
        for s in c.samples:
            seqs.append(c.prompt_token_ids + s.token_ids)
            spans.append((len(c.prompt_token_ids), len(s.token_ids)))
            samples.append(s)
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id, device=device)
    mask = torch.zeros((len(seqs), width), dtype=torch.long, device=device)
    for i, seq in enumerate(seqs):
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
    return ids, mask, spans, samples


def token_logprobs(model, ids, mask):
    """log p(token t | tokens < t) for every position after the first, in ONE forward pass."""
    import torch

    logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits[:, :-1].float(), -1)
    return logp.gather(-1, ids[:, 1:, None])[..., 0]


def grpo_loss(model, reference, batch, device, pad_id: int = 0):
    """GRPO's clipped surrogate over the completion tokens (one forward and backward pass: FSDP ranks
    issue the same collectives) and the mean log-ratio to `reference` (the starting policy)."""
    import torch

    ids, mask, spans, samples = _batch_tensors(batch, device, pad_id)
    advantages = []
    for rewards in task.rewards_of(batch):
        r = torch.tensor(rewards)
        advantages += ((r - r.mean()) / (r.std() + 1e-6) if len(rewards) > 1 else r * 0).tolist()
    logp = token_logprobs(model, ids, mask)
    with torch.no_grad():
        ref = token_logprobs(reference, ids, mask)
    terms, ratios = [], []
    for i, ((p, n), a, s) in enumerate(zip(spans, advantages, samples)):
        mine = logp[i, p - 1:p - 1 + n]
        behaviour = torch.tensor(s.logprobs, device=device) if s.logprobs is not None else mine.detach()
        ratio = torch.exp(mine - behaviour)
        terms.append(-torch.min(ratio * a, ratio.clamp(1 - CLIP, 1 + CLIP) * a).mean())
        ratios.append((mine.detach() - ref[i, p - 1:p - 1 + n]).mean())
    return torch.stack(terms).mean(), float(torch.stack(ratios).mean())


def grpo(ctx) -> list[dict[str, Any]] | None:
    import torch

    spec = ctx.spec
    torch.manual_seed(0)
    model = load_model(ctx)
    reference = load_model(ctx).eval()  # the starting policy, for the KL estimate
    for p in reference.parameters():
        p.requires_grad_(False)
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR)
    prompts = list(enumerate(task.PROMPTS))[ctx.rank::ctx.world_size]
    ahead, steps = spec.rollout.max_staleness, spec.job.steps
    saving = spec.job.checkpoint
    first, rows = 1, []
    if saving.path and (found := checkpoint.latest(saving.path)) is not None:
        meta = checkpoint.load(ctx, model, optimizer, found)
        first, ctx.version, rows = meta["step"] + 1, meta["version"], meta["rows"]
        if ctx.rank == 0:
            print(f"[rollfleet] resuming from {found} (step {meta['step']}, v{meta['version']}): the engines get "
                  f"those weights first", flush=True)
        ctx.push(model, version=ctx.version)  # a new fleet serves the base weights: send the resumed ones
    rollouts = ctx.rollouts()

    def submit(step: int) -> None:
        rollouts.submit([Request(prompt=p, tag=(step, i), params=task.params(step, i)) for i, p in prompts])

    for step in range(first, min(first + ahead, steps) + 1):
        submit(step)
    check = task.PROMPTS[:2]
    previous = [s.token_ids for c in ctx.generate(check, CHECK) for s in c.samples] if ctx.rank == 0 else None
    t_last = time.perf_counter()
    try:
        for step in range(first, steps + 1):
            batch = rollouts.take(len(prompts), version=ctx.version)
            now = time.perf_counter()
            tokens = sum(len(s.token_ids) for c in batch for s in c.samples)
            staleness = max(c.staleness(ctx.version) for c in batch)
            reward, spread = _over_ranks(ctx, task.rewards_of(batch))
            ctx.release()  # colocated: the engine on this GPU sleeps while the rank trains
            loss, kl = grpo_loss(model, reference, batch, ctx.device)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            stats = ctx.push(model)
            if step + 1 + ahead <= steps:
                submit(step + 1 + ahead)
            if ctx.rank == 0:
                rows.append(row := _row(ctx, spec, step, stats, staleness, reward, spread, kl, loss, tokens,
                                        now - t_last, rollouts, check, previous))
                previous, t_last = row.pop("_ids"), time.perf_counter()
                ctx.report(row)
            if saving.path and (step % saving.every_steps == 0 or step == steps):  # the rows: the verdict's history
                checkpoint.save(ctx, model, optimizer, {"step": step, "version": ctx.version, "data_position": step + 1,
                                                        "rows": rows})
    finally:
        rollouts.close()
    return rows if ctx.rank == 0 else None


def _over_ranks(ctx, groups: list[list[float]]) -> tuple[float, float]:
    """The mean reward and the mean spread within groups over every rank's batch (a collective)."""
    import torch

    local = torch.tensor([sum(map(sum, groups)), sum(map(len, groups)),
                          sum(statistics.pstdev(g) for g in groups), len(groups)], dtype=torch.float64)
    if ctx.world_size > 1:
        from torch import distributed as dist

        local = local.to(ctx.device)
        dist.all_reduce(local)
        local = local.cpu()
    total, count, spreads, groups_n = local.tolist()
    return total / count, spreads / groups_n


def _row(ctx, spec, step, stats, staleness, reward, spread, kl, loss, tokens, seconds, rollouts, check,
         previous) -> dict[str, Any]:
    """Rank 0's row of one step, after a greedy check that the engines serve the pushed version."""
    after = ctx.generate(check, CHECK)
    ids = [s.token_ids for c in after for s in c.samples]
    return {"step": step, "version": stats.version, "policy": spec.sync.inflight, "staleness": staleness,
            "reward": round(reward, 4), "reward_spread": round(spread, 4),
            "kl": round(kl, 4), "loss": round(float(loss.detach()), 4),
            "tokens_per_s": round(tokens / seconds, 1), "push_ms": round(stats.seconds * 1e3, 1),
            "paused_ms": round(stats.paused_seconds * 1e3, 1), "queue": rollouts.outstanding,
            "resent": rollouts.stats["resent"], "checksums_ok": stats.checksums_ok,
            "outputs_changed": ids != previous,
            "versions_stamped": all(s.versions == ((0, stats.version),) for c in after for s in c.samples),
            "requests": dict(rollouts.stats), "_ids": ids}


def table_header() -> str:
    return "  ".join(f"{c:>{max(len(c), 8)}}" for c in COLUMNS)


def table_row(row: dict[str, Any]) -> str:
    return "  ".join(f"{str(row[c]):>{max(len(c), 8)}}" for c in COLUMNS)


def verdict(rows: list[dict[str, Any]], max_staleness: int) -> tuple[bool, str]:
    """The run's verdict: the loop's own checks on every step (checksums, version stamps, the
    staleness bound), then whether the reward rose (task.verdict)."""
    broken = [f"step {r['step']}: " + ", ".join(k for k, bad in (
        ("checksums differ", r["checksums_ok"] is False), ("outputs not stamped with the pushed version",
                                                           not r["versions_stamped"]),
        (f"staleness {r['staleness']} > {max_staleness}", r["staleness"] > max_staleness)) if bad)
        for r in rows if r["checksums_ok"] is False or not r["versions_stamped"] or r["staleness"] > max_staleness]
    if broken:
        return False, "; ".join(broken)
    return task.verdict(rows)
