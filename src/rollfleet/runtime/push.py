"""A weight push's vocabulary, shared by both transports (sync.py's broadcast, ipc.py's handoff),
the engines that receive and the trainers that send."""

from __future__ import annotations

import dataclasses
from typing import Any, Iterable, Iterator, Protocol


@dataclasses.dataclass(frozen=True)
class Push:
    """A push's one control message. It carries no tensor metadata: each bucket travels behind a small
    header, so the sender packs straight from a lazy iterator and the control call reaches the engines
    before the first tensor exists."""

    version: int
    bucket_bytes: int
    verify: bool
    inflight: str = "wait"  # what each engine does with requests in flight (sync.inflight)
    group: str = ""  # the sync group it goes over (host:port): an engine that joined another since refuses it

    def to_wire(self) -> dict[str, Any]:
        """Plain data for RPC layers that do not keep dataclasses (vLLM's collective_rpc)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_wire(cls, data: Push | dict[str, Any]) -> Push:
        return data if isinstance(data, Push) else cls(**data)


@dataclasses.dataclass(frozen=True)
class PushStats:
    version: int
    bytes: int
    buckets: int
    tensors: int
    seconds: float
    engines: int
    checksums_ok: bool | None  # None when sync.verifyChecksums is off
    send_seconds: float  # the sender's data path: pack + send until the last bucket left
    profile: tuple = ()  # per engine: drain / receive+reset / paused seconds, in-flight policy
    mode: str = "nccl"  # nccl / gloo (a broadcast from rank 0); colocated: direct or staged (ipc.py)
    attempts: int = 1  # > 1: the push was sent again after an engine fault (TrainerContext.push)

    @property
    def gbps(self) -> float:
        return self.bytes / self.seconds / 1e9

    @property
    def paused_seconds(self) -> float:
        """The longest time any engine admitted no new request for this push."""
        return max((p["paused_seconds"] for p in self.profile), default=0.0)


class Sender(Protocol):
    """What a trainer rank pushes through: sync.WeightSender (a broadcast from rank 0 to every engine) or
    ipc.IpcSender (the handoff to the engine on this rank's GPU)."""

    version: int  # the newest version this sender pushed

    def push(self, weights: Any, verify: bool | None = None, version: int | None = None) -> PushStats:
        """Send `weights` (a model, or HF-named unsharded tensors) as `version` (default: one more)."""


def full_tensors(model) -> Iterator[tuple[str, Any]]:
    """HF-named, unsharded tensors of `model`, gathered one at a time. EVERY rank must iterate it to
    the end, in the same order (the gathers are collectives); only rank 0 needs the values.
    FSDP2 (`fully_shard`): `DTensor.full_tensor()` per parameter. DeepSpeed ZeRO-3: the parameters of
    one module at a time under `deepspeed.zero.GatheredParameters`. Anything else: as it is."""
    seen: set[int] = set()  # a tied weight (lm_head = embed_tokens) goes once, as named_parameters() has it
    for module_name, module in model.named_modules():
        params = [(n, p) for n, p in module.named_parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for _, p in params)
        if not params:
            continue
        prefix = f"{module_name}." if module_name else ""
        if any(hasattr(p, "ds_id") for _, p in params):  # DeepSpeed ZeRO-3 partitions
            import deepspeed

            with deepspeed.zero.GatheredParameters([p for _, p in params]):
                for name, p in params:
                    yield prefix + name, p.data
            continue
        for name, p in params:
            yield prefix + name, p.full_tensor().detach() if hasattr(p, "full_tensor") else p.detach()


def sharded(model) -> bool:
    """Whether gathering `model` is a collective (FSDP2 DTensors, ZeRO-3 partitions)."""
    return any(hasattr(p, "full_tensor") or hasattr(p, "ds_id") for p in model.parameters())


def weights_of(weights: Any) -> Iterable[tuple[str, Any]]:
    """A model's gathered tensors, or the iterable of (name, tensor) it already is."""
    import torch

    return full_tensors(weights) if isinstance(weights, torch.nn.Module) else weights
