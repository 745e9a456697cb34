"""The reference path: regenerate every delivered token from the weights of the version it is stamped
with, on the CPU stand-in's own decoding (a fresh StandinCore per version, no Ray, no prefix cache
from earlier), and report every token that differs.

A sample's `versions` say which weights produced which stretch of its tokens; each stretch is
regenerated as the engine generated it: from the prompt plus the tokens before it, with the request's
sampling params reduced by those tokens, batched with the samples of its request that the engine
batched it with (same version, same prefix, same params), so the arithmetic is the engine's."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import torch

from rollfleet import demo
from rollfleet.runtime import tiny
from rollfleet.runtime.engine import continued
from rollfleet.runtime.rollout import Completion, sampling_params
from rollfleet.runtime.standin import StandinCore


def weights(version: int) -> dict[str, torch.Tensor]:
    """The weights a test pushes as `version` (0: the model the engines start from)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tiny.ensure()), dtype=torch.float32)
    g = torch.Generator().manual_seed(version)
    return {n: p.detach() + (0.3 * torch.randn(p.shape, generator=g) if version else 0)
            for n, p in model.named_parameters()}


class Reference:
    """Stand-in cores on the weights of each version, made on first use."""

    def __init__(self, spec=None):
        self.spec = spec or demo.local_spec(["vllm.enablePrefixCaching=false"])
        self.cores: dict[int, StandinCore] = {}
        self.loop = asyncio.new_event_loop()

    def core(self, version: int) -> StandinCore:
        if version not in self.cores:
            core = StandinCore(self.spec, str(tiny.ensure()))
            self.loop.run_until_complete(core.start())
            core.load_weights(list(weights(version).items()))
            self.cores[version] = core
        return self.cores[version]

    def close(self) -> None:
        for core in self.cores.values():
            self.loop.run_until_complete(core.shutdown())
        self.loop.run_until_complete(asyncio.sleep(0))
        self.loop.close()

    def generate(self, version: int, jobs: list[tuple[int, list[int], dict[str, Any]]]) -> dict[int, dict]:
        out: dict[int, dict] = {}
        self.loop.run_until_complete(self.core(version).generate(
            "reference", jobs, "reference", lambda i, o: out.__setitem__(i, o)))
        return out

    def mismatches(self, c: Completion, params: dict[str, Any]) -> list[str]:
        """Every stretch of `c`'s samples that its stamped version does not reproduce, one line each."""
        params = sampling_params(params)
        batches: dict[tuple, list[tuple[int, int, int]]] = {}  # (version, prefix, params) -> (sample, start, end)
        for s in c.samples:
            for k, (start, version) in enumerate(s.versions):
                end = s.versions[k + 1][0] if k + 1 < len(s.versions) else len(s.token_ids)
                prefix = tuple(c.prompt_token_ids + s.token_ids[:start])
                key = (version, prefix, json.dumps(continued(params, start), sort_keys=True))
                batches.setdefault(key, []).append((s.index, start, end))
        by_index = {s.index: s for s in c.samples}
        problems = []
        for (version, prefix, p), rows in batches.items():
            got = self.generate(version, [(i, list(prefix), json.loads(p)) for i, _, _ in rows])
            for i, start, end in rows:
                sample, ref = by_index[i], got[i]["token_ids"]
                final = end == len(sample.token_ids)
                want = sample.token_ids[start:end]
                if (ref != want) if final else (ref[:end - start] != want):
                    problems.append(f"{c.request_id} sample {i} tokens {start}:{end} on v{version}: delivered "
                                    f"{want[:8]}..., v{version} gives {ref[:8]}...")
        return problems
