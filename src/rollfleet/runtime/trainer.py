"""The built-in GRPO-shaped smoke trainer: generate → reward → one optimizer step → push, per step.

It proves the loop end to end (engines, sync group, versions, prefix reset); it is not a recipe.
The reward is a toy (share of completion tokens with an even id), so that a step changes weights.
Runs as a Ray actor on the trainer pool (`resources={"trainer": 1}`), rank 0 of the sync group.
"""

from __future__ import annotations

import time
from typing import Any

from rollfleet.runtime.fleet import Fleet
from rollfleet.spec import load_spec

PROMPTS = ["The answer to the question is", "hello world, the model says", "One two three four",
           "What is the color of the tree?"]
SAMPLES = 4  # GRPO group size per prompt


class SmokeTrainer:
    def __init__(self, spec_json: dict[str, Any], model: str):
        import torch
        from transformers import AutoModelForCausalLM

        self.spec = load_spec(spec_json)
        gpu = self.spec.engine == "vllm"
        torch.manual_seed(0)
        if not gpu:
            torch.set_num_threads(1)
        self.device = torch.device("cuda", torch.cuda.current_device()) if gpu else torch.device("cpu")
        dtype = getattr(torch, self.spec.model.dtype) if self.spec.model.dtype != "auto" else torch.float32
        self.model = AutoModelForCausalLM.from_pretrained(model, revision=self.spec.model.revision,
                                                          dtype=dtype).to(self.device)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-2)

    def param_sums(self, names: list[str]) -> dict[str, float]:
        params = dict(self.model.named_parameters())
        return {n: float(params[n].detach().double().sum()) for n in names}

    def _grpo_step(self, outs) -> float:
        import torch

        by_prompt: dict[int, list] = {}
        for o in outs:
            by_prompt.setdefault(o.prompt_index, []).append(o)
        loss_terms = []
        for prompt_index, group in by_prompt.items():
            rewards = torch.tensor([sum(t % 2 == 0 for t in o.token_ids) / max(len(o.token_ids), 1)
                                    for o in group], dtype=torch.float32)
            adv = (rewards - rewards.mean()) / (rewards.std() + 1e-6) if len(group) > 1 else rewards * 0
            for a, o in zip(adv.tolist(), group):
                if not o.token_ids:
                    continue
                # log-prob of the sampled completion under the current policy (without its prompt: a smoke
                # test of the loop, not a recipe)
                ids = torch.tensor([o.token_ids], device=self.device)
                logits = self.model(ids).logits[:, :-1].float()
                logp = torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None]).sum()
                loss_terms.append(-a * logp)
        loss = torch.stack(loss_terms).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return float(loss.detach())

    def run(self, fleet: Fleet, steps: int) -> list[dict[str, Any]]:
        sender = fleet.sender(self.device)
        greedy = {"temperature": 0.0, "max_tokens": 16}
        rows = []
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            outs = fleet.generate(PROMPTS, {"n": SAMPLES, "temperature": 1.0, "max_tokens": 16, "seed": step})
            gen_s = time.perf_counter() - t0
            tokens = sum(len(o.token_ids) for o in outs)
            loss = self._grpo_step(outs)
            before = fleet.generate(PROMPTS, greedy)
            stats = sender.push(self.model.named_parameters())
            after = fleet.generate(PROMPTS, greedy)
            rows.append({
                "step": step, "version": stats.version, "loss": round(loss, 4),
                "push_ms": round(stats.seconds * 1e3, 1), "bytes": stats.bytes, "buckets": stats.buckets,
                "gbps": round(stats.gbps, 3), "checksums_ok": stats.checksums_ok,
                "tokens_per_s": round(tokens / gen_s, 1),
                "outputs_changed": [o.token_ids for o in before] != [o.token_ids for o in after],
                "versions_stamped": all(o.weight_version == stats.version for o in after),
            })
        return rows


def table(rows: list[dict[str, Any]]) -> str:
    cols = ["step", "version", "push_ms", "bytes", "buckets", "gbps", "checksums_ok", "tokens_per_s",
            "outputs_changed", "versions_stamped", "loss"]
    width = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in cols}
    lines = ["  ".join(c.rjust(width[c]) for c in cols)]
    lines += ["  ".join(str(r[c]).rjust(width[c]) for c in cols) for r in rows]
    return "\n".join(lines)


def passed(rows: list[dict[str, Any]]) -> bool:
    return bool(rows) and all(r["checksums_ok"] is not False and r["outputs_changed"] and r["versions_stamped"]
                              for r in rows)
