"""Which `vllm.extraEngineArgs` keys vLLM takes: the installed vLLM's `EngineArgs` fields, read statically
(importing vLLM takes seconds), else vllm_engine_args.txt (the image's vLLM 0.14.1; tests/test_vllm_compat.py
checks it against the wheel). The chart's schema lists the latter."""

from __future__ import annotations

import ast
import difflib
import functools
import importlib.util
import re
from pathlib import Path

LIST = Path(__file__).with_name("vllm_engine_args.txt")
# Engine arguments rollfleet sets itself: the fix for each.
_REMOVE = "rollfleet sets it ({}); remove it"
OWNED = {
    **{arg: f"rollfleet sets it; set {key} instead" for arg, key in {
        "model": "model.name", "tokenizer": "model.name", "revision": "model.revision", "dtype": "model.dtype",
        "max_model_len": "model.maxModelLen", "seed": "vllm.seed", "tensor_parallel_size": "vllm.tensorParallelSize",
        "gpu_memory_utilization": "vllm.gpuMemoryUtilization", "enable_prefix_caching": "vllm.enablePrefixCaching",
        "enforce_eager": "vllm.enforceEager", "max_num_seqs": "vllm.maxNumSeqs"}.items()},
    "distributed_executor_backend": _REMOVE.format("uni for TP 1, mp above; never ray inside a Ray actor"),
    "worker_extension_cls": _REMOVE.format("the weight-sync extension"),
    "enable_sleep_mode": _REMOVE.format("on in the colocated layout, where the engine sleeps while its GPU trains"),
    "hf_token": "a token is a secret and would be rendered into the ConfigMap; set model.hfTokenSecret (a Secret)",
}

def listed() -> list[str]:
    return [line for line in LIST.read_text().splitlines() if line and not line.startswith("#")]


def fields_in(source: str) -> list[str]:
    """The public annotated fields of `class EngineArgs` in vLLM's engine/arg_utils.py."""
    for node in ast.parse(source).body:
        if isinstance(node, ast.ClassDef) and node.name == "EngineArgs":
            return sorted(s.target.id for s in node.body if isinstance(s, ast.AnnAssign)
                          and isinstance(s.target, ast.Name) and not s.target.id.startswith("_"))
    return []


@functools.lru_cache(maxsize=1)
def known() -> frozenset[str]:
    """The installed vLLM's engine arguments where vLLM is installed, else the image's list."""
    spec = importlib.util.find_spec("vllm")
    origin = Path(spec.origin).parent / "engine" / "arg_utils.py" if spec and spec.origin else None
    names = fields_in(origin.read_text()) if origin and origin.is_file() else []
    return frozenset(names or listed())


def problem(key: str) -> str | None:
    """What is wrong with an extraEngineArgs key, with the fix; None when vLLM takes it."""
    snake = re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", key.lstrip("-")).replace("-", "_").lower()
    if key != snake:
        return f"write engine arguments in snake_case, as vLLM's EngineArgs names them: {snake}"
    if key in OWNED:
        return OWNED[key]
    if key not in known():
        close = difflib.get_close_matches(key, sorted(known() - OWNED.keys()), n=1)
        return "not an engine argument of vLLM" + (f"; did you mean {close[0]}?" if close else "")
    return None


def schema_names() -> list[str]:
    """The keys the chart's schema allows (the image's list, so the schema does not depend on this machine)."""
    return sorted(set(listed()) - OWNED.keys())
