"""Rank 0 of the weight-sync group (the dedicated layout): `push()` sends one weight version to every
member engine in one broadcast stream (sync.py's data path).

The group is formed over the engines that are members when a push starts (started: serving or stale),
and formed again, on a new port with a new world size and ranks, whenever that set changes or a push
failed: nobody grows a live communicator. In the no-fault case a push costs one roster read on top of
the broadcast. A push that fails names the engine that stopped making progress, leaves every member
stale (its weights undefined: it serves nothing until a push reaches it), and the next push forms the
group again over whoever is a member then."""

from __future__ import annotations

import time
from typing import Any, Iterable

from rollfleet.runtime import sync
from rollfleet.runtime.calls import actor_died, failures, first_failure, gather
from rollfleet.runtime.push import Push, PushStats, weights_of
from rollfleet.runtime.supervisor import MEMBERS, FleetFailed

FORM_ATTEMPTS = 3  # a rendezvous that loses an engine is tried again over the members then


class WeightSender:
    """Rank 0 of the sync group. `push()` sends one weight version to every member engine."""

    def __init__(self, fleet, device: Any = None):
        import torch

        spec = fleet.spec
        self.fleet, self.timeouts = fleet, fleet.timeouts
        self.timeout_s = self.timeouts.sync.seconds
        self.bucket_bytes = spec.sync.bucket_mib << 20
        self.inflight = spec.sync.inflight
        if device is None:
            device = torch.device("cuda", torch.cuda.current_device()) if spec.engine == "vllm" else "cpu"
        self.device = torch.device(device)
        self.version = fleet.version  # versions only increase over the fleet's life
        self.members: tuple[tuple[int, str | None], ...] = ()
        self.transport = self.store = None
        self.group = ""
        self.broken = True  # no group yet
        self._orphans: list[Any] = []  # calls of a failed push or rendezvous, collected later (no noise)
        self._form_with_retries()

    # ---- the group ------------------------------------------------------------------------------

    def _members(self) -> tuple[tuple[int, str | None], ...]:
        roster = self.fleet.roster()
        if roster["failed"]:
            raise FleetFailed(roster["failed"])
        self.version = max(self.version, roster["version"])  # another sender may have pushed since
        return tuple((e["index"], e["incarnation"]) for e in roster["engines"] if e["state"] in MEMBERS)

    def _form_with_retries(self) -> None:
        for attempt in range(FORM_ATTEMPTS):
            try:
                self._form(self._members())
                return
            except sync.SyncError as exc:
                if attempt + 1 == FORM_ATTEMPTS:
                    raise
                print(f"[rollfleet] {exc}; forming the sync group again", flush=True)
                self.fleet.settle(self.timeouts.init.outer)

    def _form(self, members: tuple[tuple[int, str | None], ...]) -> None:
        import ray

        spec = self.fleet.spec
        if not members:
            raise sync.SyncError("sync group: no engine is started; see fleet.health()")
        tp = spec.vllm.tensor_parallel_size
        t = self.timeouts.sync
        host = ray.util.get_node_ip_address()  # the trainer pod's IP, never 0.0.0.0
        world = 1 + len(members) * tp
        self._drop()
        store, port = sync.open_store(host, world, t.seconds)
        indices = [i for i, _ in members]
        print(f"[rollfleet] sync group: {spec.sync_backend} world {world} on {host}:{port}; waiting up to "
              f"{t.within} for engine(s) {indices}", flush=True)
        joins = [self.fleet.engines[i].join.remote(host, port, world, position) for position, i in enumerate(indices)]
        name = (lambda position: f"engine {indices[position]}")
        deadline = t.deadline()
        try:
            sync.wait_joined(store, world, tp, t.seconds, failed=lambda: first_failure(joins, name), engines=indices)
            transport = sync.with_deadline(
                lambda: sync.make_transport(spec.sync_backend, store, 0, world, self.device, t.seconds),
                max(deadline - time.monotonic(), 1), "sync group init on rank 0 (trainer)")
            gather(joins, deadline, "sync group join", t.within, name, failed=sync.SyncError)
        except (sync.SyncError, TimeoutError) as exc:
            self._report_dead(joins, indices, members)
            self._orphans += joins
            raise sync.SyncError(str(exc)) from None
        self.members, self.transport, self.store, self.broken = members, transport, store, False
        self.group = f"{host}:{port}"

    def _collect_orphans(self) -> None:
        """Collect what the calls of a failed push or rendezvous returned since (their errors are
        known): Ray prints an 'unhandled error' for a result nobody collects."""
        import ray

        done, self._orphans = ray.wait(self._orphans, num_returns=len(self._orphans), timeout=0) \
            if self._orphans else ([], [])
        for ref in done:
            try:
                ray.get(ref)
            except Exception:
                pass

    def _drop(self) -> None:
        """Give the current group up: its receivers stop waiting, its pending work is aborted."""
        if self.transport is not None:
            self.transport.abandon()
            sync.retire(self.transport)
        self.transport = self.store = None
        self.broken = True

    def _report_dead(self, refs: list[Any], indices: list[int], members) -> None:
        """Tell the supervisor of members whose call failed because their process is gone."""
        for position, exc in failures(refs):
            if actor_died(exc):
                self.fleet.report(indices[position], members[position][1], f"died in the sync group ({exc})")

    # ---- a push ---------------------------------------------------------------------------------

    def push(self, weights: Iterable[tuple[str, Any]] | Any, verify: bool | None = None,
             version: int | None = None) -> PushStats:
        """Stream HF-named, unsharded tensors (or a model, gathered by push.full_tensors, which every
        trainer rank must then iterate too: ctx.push does) to every member engine, bucket by bucket,
        consuming them lazily (extra memory on this rank: two buckets + the one tensor read ahead). Each
        engine applies `sync.inflight`, loads, resets its prefix cache, and its checksums must equal
        the sender's (`verify`, default sync.verifyChecksums). `version`: default one more than the
        last; the same again re-sends it (to members that lack it after a fault)."""
        members = self._members()
        self._collect_orphans()
        if self.broken or members != self.members:
            self._form(members)
        spec = self.fleet.spec
        push = Push(self.version + 1 if version is None else version, self.bucket_bytes,
                    spec.sync.verify_checksums if verify is None else verify, self.inflight, self.group)
        what = f"push v{push.version}"
        indices = [i for i, _ in members]
        name = (lambda position: f"engine {indices[position]}")
        t0 = time.perf_counter()
        deadline = self.timeouts.sync.deadline()
        acks = [self.fleet.engines[i].receive.remote(push) for i in indices]  # before the first tensor exists
        try:
            sent = sync.send(push, weights_of(weights), self.transport, deadline, lambda: first_failure(acks, name))
            send_seconds = time.perf_counter() - t0
            results = gather(acks, deadline, what, self.timeouts.sync.within, name, failed=sync.SyncError)
            if push.verify:
                for r in results:
                    for tp_rank, sums in enumerate(r["checksums"]):
                        if sums != sent.checksums:
                            buckets = [k for k, (a, b) in enumerate(zip(sums, sent.checksums)) if a != b] or "count"
                            raise sync.SyncError(f"{what}: engine {r['engine']} TP rank {tp_rank} checksum mismatch "
                                                 f"in bucket(s) {buckets}; the transport corrupted data")
        except (sync.SyncError, TimeoutError) as exc:
            self._drop()
            reason = self._blame(exc, acks, indices, members)
            self._orphans += acks
            self.fleet.unsynced(members, f"{what} failed")
            raise sync.SyncError(reason) from None
        self.version = max(self.version, push.version)
        self.fleet.synced(push.version, members)
        profile = tuple({k: (round(v, 5) if isinstance(v, float) else v) for k, v in r.items() if k != "checksums"}
                        for r in results)
        return PushStats(push.version, sent.bytes, sent.buckets, sent.tensors, time.perf_counter() - t0, len(results),
                         True if push.verify else None, send_seconds, profile, spec.sync_backend)

    def _blame(self, exc: BaseException, acks: list[Any], indices: list[int], members) -> str:
        """Name the engine that stopped making progress, not a healthy one that timed out waiting."""
        self._report_dead(acks, indices, members)
        stuck = self.fleet.unresponsive(indices)
        if not stuck:  # every engine answers: whatever Ray already knows, or the error itself
            deadline = time.monotonic() + min(5.0, self.timeout_s)
            name = (lambda position: f"engine {indices[position]}")
            while time.monotonic() < deadline and not first_failure(acks, name):
                time.sleep(0.05)
            failure = first_failure(acks, name)
            stuck = [failure] if failure and failure not in str(exc) else []
        culprit = "; ".join(stuck) or "no engine reported an error"
        return (f"{exc}; {culprit}. Every member's weights are undefined until a push reaches it again: the sync "
                f"group forms again for the next push")
