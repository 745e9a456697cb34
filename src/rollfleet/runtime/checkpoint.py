"""The built-in trainer's checkpoints (job.checkpoint): model and optimizer through PyTorch's
distributed checkpoint (every rank writes its shards; FSDP2 and plain models alike), plus the step,
the weight version and the data position in `meta.json`, written last by rank 0, so a directory
without it is an unfinished checkpoint and is never resumed from.

    <path>/step-00000012/{.metadata, __0_0.distcp, ..., meta.json}
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

META = "meta.json"


def _dirs(path: Path) -> list[Path]:
    return sorted(p for p in path.glob("step-*") if (p / META).exists())


def latest(path: str | Path) -> Path | None:
    """The newest complete checkpoint under `path`, or None."""
    found = _dirs(Path(path)) if Path(path).exists() else []
    return found[-1] if found else None


def save(ctx, model, optimizer, meta: dict[str, Any]) -> Path:
    """Every rank calls it. `meta` (step, version, data position) is what a resume continues from."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    spec = ctx.spec.job.checkpoint
    target = Path(spec.path) / f"step-{meta['step']:08d}"
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(target))
    if dist.is_initialized():
        dist.barrier()  # every rank's shards are written
    if ctx.rank == 0:
        partial = target / f"{META}.partial"
        partial.write_text(json.dumps(meta))
        partial.replace(target / META)  # atomic: a crash mid-write never leaves a meta.json to resume from
        for old in _dirs(Path(spec.path))[:-spec.keep]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def load(ctx, model, optimizer, where: Path) -> dict[str, Any]:
    """Every rank calls it: model and optimizer as saved; returns the saved meta."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(where))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    return json.loads((where / META).read_text())
