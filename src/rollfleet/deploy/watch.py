"""Watching a fleet come up, and the reasons it does not: where it stands (from the RayJob/RayCluster
and its pods), waits that say what they wait for and for how long, and one line per problem the
pods and events show, each with the values field to change.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from typing import Callable

from rollfleet.deploy.client import Kube
from rollfleet.deploy.fleet import GPU, Fleet
from rollfleet.deploy.preflight import CHECK_OPERATOR

POLL_SECONDS = 2.0
HEARTBEAT_SECONDS = 30.0  # reprint the progress line this often even when nothing changed
OPERATOR_GRACE_SECONDS = 30.0  # a RayJob/RayCluster with no status after this long: no operator reconciles it
FAILED = 1


def say(line: str) -> None:
    print(line, flush=True)


def err(line: str) -> None:
    print(f"error: {line}", file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Snapshot:
    line: str  # one-line progress
    done: bool
    failure: str | None
    found: bool  # the RayJob / RayCluster exists
    has_status: bool = False  # the operator has written its status
    state: dict = field(default_factory=dict)  # the status fields the line shows
    pods: dict = field(default_factory=dict)  # component -> {"ready": n, "want": m}


def ready(pod: dict) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def pod_counts(fleet: Fleet, pods: list[dict]) -> dict[str, dict[str, int]]:
    count = dict.fromkeys(fleet.want, 0)
    for pod in pods:
        component = (pod["metadata"].get("labels") or {}).get("app.kubernetes.io/component")
        if component in count and ready(pod):
            count[component] += 1
    return {k: {"ready": count[k], "want": want} for k, want in fleet.want.items()}


def judge(fleet: Fleet, until: str, top: dict | None, pods: list[dict]) -> Snapshot:
    """Where the fleet stands, from its RayJob or RayCluster, and its pods."""
    if top is None:
        return Snapshot(f"{fleet.top}: not found", False, None, False)
    st = top.get("status") or {}
    counts = pod_counts(fleet, pods)
    pods_line = "pods ready: " + ", ".join(f"{k} {v['ready']}/{v['want']}" for k, v in counts.items())
    if fleet.kind == "RayJob":
        deployment, job = st.get("jobDeploymentStatus") or "-", st.get("jobStatus") or "-"
        cluster = st.get("rayClusterStatus") or {}
        state = {"jobDeploymentStatus": deployment, "jobStatus": job, "rayClusterName": st.get("rayClusterName") or "-",
                 "rayClusterState": cluster.get("state") or "-"}
        line = (f"{fleet.top}: deployment {deployment}, job {job}; RayCluster {state['rayClusterName']}: "
                f"{state['rayClusterState']}; {pods_line}")
        failure = None
        if deployment in ("Failed", "ValidationFailed") or job in ("FAILED", "STOPPED") \
                or (deployment == "Complete" and job != "SUCCEEDED"):
            why = ": ".join(x for x in (st.get("reason"), st.get("message")) if x)
            failure = f"{fleet.top} failed: deployment {deployment}, job {job}" + (f" ({why})" if why else "")
        done = deployment == "Complete" if until == "complete" else deployment in ("Running", "Complete")
        return Snapshot(line, done and failure is None, failure, True, bool(st), state, counts)
    state_name = st.get("state") or "-"
    provisioned = any(c.get("type") == "RayClusterProvisioned" and c.get("status") == "True"
                      for c in st.get("conditions") or [])
    failure = f"{fleet.top} failed: {st.get('reason') or st.get('message') or 'state failed'}" \
        if state_name == "failed" else None
    return Snapshot(f"{fleet.top}: {state_name}; {pods_line}", state_name == "ready" or provisioned, failure, True,
                    bool(st), {"state": state_name}, counts)


def observe(kube: Kube, fleet: Fleet, until: str) -> tuple[Snapshot, list[dict]]:
    top = kube.get(fleet.kind, fleet.name, fleet.namespace)
    pods = kube.list("Pod", fleet.namespace, labels=fleet.selector)
    return judge(fleet, until, top, pods), pods


def waiting_for(fleet: Fleet, until: str) -> tuple[str, str]:
    """(what is waited for, what it is once reached)."""
    if fleet.kind == "RayCluster":
        pods = " + ".join(f"{n} {k}" for k, n in fleet.want.items())
        return f"{fleet.top} to be ready (state ready: {pods} pod(s))", "is ready"
    if until == "complete":
        return f"{fleet.top} to succeed (jobDeploymentStatus Complete, jobStatus SUCCEEDED)", "succeeded"
    return f"{fleet.top} to be running (jobDeploymentStatus Running: cluster ready, job submitted)", "is running"


def no_operator(fleet: Fleet, seconds: float) -> str:
    return (f"{fleet.top} has no status after {seconds:.0f}s: no KubeRay operator reconciles it (not installed, not "
            f"running, or not watching namespace {fleet.namespace}); check: {CHECK_OPERATOR}, then its logs")


def wait(kube: Kube, fleet: Fleet, until: str, timeout: float, out: Callable[[str], None] = say) -> int:
    """Poll until the fleet is ready (or complete), fails, gets no status from an operator within
    OPERATOR_GRACE_SECONDS, or `timeout` passes; progress lines go to `out`."""
    from kubernetes.dynamic.exceptions import DynamicApiError
    from urllib3.exceptions import HTTPError

    what, reached = waiting_for(fleet, until)
    out(f"waiting up to {timeout:g}s for {what}")
    start = time.monotonic()
    last, last_at, seen = None, 0.0, set()
    snap = Snapshot("nothing observed yet", False, None, False)
    while True:
        elapsed = time.monotonic() - start
        try:
            snap, pods = observe(kube, fleet, until)
            news = [p for p in pod_problems(fleet, pods, []) if p not in seen] if not snap.done else []
        except (DynamicApiError, HTTPError) as exc:  # a blip: say so, keep waiting until the timeout
            snap, news = Snapshot(f"API request failed ({getattr(exc, 'status', '')} {exc}); retrying",
                                  False, None, snap.found, snap.has_status), []
        if snap.line != last or elapsed - last_at >= HEARTBEAT_SECONDS:
            out(f"[{elapsed:5.0f}s] {snap.line}")
            last, last_at = snap.line, elapsed
        for p in news:
            out(f"[{elapsed:5.0f}s] problem: {p}")
            seen.add(p)
        if snap.failure:
            err(snap.failure)
            for reason in diagnose(kube, fleet):
                err(reason)
            return FAILED
        if snap.done:
            out(f"{fleet.top} {reached} ({elapsed:.0f}s)")
            return 0
        if snap.found and not snap.has_status and elapsed >= OPERATOR_GRACE_SECONDS:
            err(no_operator(fleet, elapsed))
            return FAILED
        if elapsed >= timeout:
            err(f"timed out after {timeout:g}s waiting for {what}")
            err(f"last seen: {snap.line}")
            reasons = diagnose(kube, fleet)
            for reason in reasons:
                err(reason)
            if snap.found and not snap.has_status:
                err(no_operator(fleet, elapsed))
            elif not reasons:
                err("no pod or event reports a problem: images may still be pulling or engines loading; "
                    "raise --timeout (or timeouts.initSeconds)")
            return FAILED
        next_check = min(timeout, OPERATOR_GRACE_SECONDS) if snap.found and not snap.has_status else timeout
        time.sleep(min(POLL_SECONDS, max(next_check - elapsed, 0.0)))


def wait_gone(kube: Kube, items: list[tuple[str, str, str]], timeout: float, out: Callable[[str], None] = say) -> int:
    """Wait until every (kind, namespace, name) is gone."""
    what = ", ".join(f"{k} {ns}/{n}" for k, ns, n in items)
    out(f"waiting up to {timeout:g}s for {what} to be gone")
    deadline = time.monotonic() + timeout
    left = list(items)
    while True:
        left = [(k, ns, n) for k, ns, n in left if kube.get(k, n, ns) is not None]
        if not left:
            out("gone")
            return 0
        if time.monotonic() >= deadline:
            err(f"timed out after {timeout:g}s waiting for {', '.join(f'{k} {ns}/{n}' for k, ns, n in left)} "
                f"to be gone (a finalizer may hold it: is the KubeRay operator running? {CHECK_OPERATOR})")
            return FAILED
        time.sleep(min(POLL_SECONDS, max(deadline - time.monotonic(), 0.0)))


# ---- reasons, from pods and events --------------------------------------------------------------

def field_of(pod: dict) -> str:
    labels = pod["metadata"].get("labels") or {}
    component = labels.get("app.kubernetes.io/component")
    if component in ("trainer", "inference", "colocated"):
        return f"pools.{component}"
    return "head" if component == "head" else "job"


def hint(text: str, where: str) -> str:
    if f"Insufficient {GPU}" in text:
        return (f"; not enough free {GPU} on nodes matching {where}: free GPUs, add nodes, or lower "
                f"{where}.nodes / {where}.gpusPerNode")
    for resource in ("memory", "cpu"):
        if f"Insufficient {resource}" in text:
            return f"; no node has {where}.{resource} free: lower it or add bigger nodes"
    if "untolerated taint" in text:
        return f"; add a matching toleration to {where}.tolerations"
    if "affinity/selector" in text:
        return f"; no node has the labels {where}.gpuProduct / {where}.nodeSelector ask for"
    if any(r in text for r in ("ImagePullBackOff", "ErrImagePull", "InvalidImageName", "pull image")):
        return ("; check image.repository, image.tag (or image.digest) and image.pullSecrets; on kind, "
                "`kind load docker-image` it first")
    if "OOMKilled" in text:
        return f"; raise {where}.memory"
    if "CrashLoopBackOff" in text:
        return "; see `rollfleet logs --component ...`"
    return ""


BAD_WAITING = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName", "CreateContainerConfigError",
               "CreateContainerError", "CrashLoopBackOff")
POD_EVENT_REASONS = ("FailedScheduling", "Failed", "FailedMount", "FailedCreatePodSandBox", "Evicted",
                     "FailedAttachVolume")


def pod_problems(fleet: Fleet, pods: list[dict], events: list[dict]) -> list[str]:
    """One line per problem a pod shows: unschedulable (the scheduler's message), image pulls, OOM,
    crash loops; plus Warning events about these pods and about the RayJob / RayCluster itself."""
    out: list[str] = []
    names = {}
    for pod in pods:
        name, where = pod["metadata"]["name"], field_of(pod)
        names[name] = where
        label = f"pod {name} ({where})"
        status = pod.get("status") or {}
        for c in status.get("conditions") or []:
            if c.get("type") == "PodScheduled" and c.get("status") == "False" and c.get("reason") == "Unschedulable":
                out.append(f"{label}: unschedulable: {c.get('message', '')}{hint(c.get('message', ''), where)}")
        for cs in (status.get("initContainerStatuses") or []) + (status.get("containerStatuses") or []):
            waiting = (cs.get("state") or {}).get("waiting") or {}
            if waiting.get("reason") in BAD_WAITING:
                text = f"{waiting['reason']}: {waiting.get('message', '')}".rstrip(": ")
                out.append(f"{label}: container {cs['name']} {text}{hint(waiting['reason'], where)}")
            for state in ("state", "lastState"):
                terminated = (cs.get(state) or {}).get("terminated") or {}
                if terminated.get("reason") == "OOMKilled":
                    out.append(f"{label}: container {cs['name']} was OOMKilled (out of its memory limit)"
                               f"{hint('OOMKilled', where)}")
    for ev in events:
        obj = ev.get("involvedObject") or {}
        reason, message = ev.get("reason", ""), " ".join((ev.get("message") or "").split())
        if obj.get("kind") == "Pod" and obj.get("name") in names and reason in POD_EVENT_REASONS:
            where = names[obj["name"]]
            line = f"pod {obj['name']} ({where}): {reason}: {message}{hint(message, where)}"
            if not any(message and message in o for o in out):
                out.append(line)
        elif (obj.get("kind"), obj.get("name")) == (fleet.kind, fleet.name) or (
                obj.get("kind") == "RayCluster" and obj.get("name", "").startswith(fleet.name)):
            out.append(f"{obj['kind']} {fleet.namespace}/{obj['name']}: {reason}: {message}")
    return list(dict.fromkeys(out))


def diagnose(kube: Kube, fleet: Fleet) -> list[str]:
    pods = kube.list("Pod", fleet.namespace, labels=fleet.selector)
    if fleet.kind == "RayJob":
        pods += kube.list("Pod", fleet.namespace, labels=f"job-name={fleet.name}")  # the submitter Job's pods
    events = kube.list("Event", fleet.namespace, fields="type=Warning")
    return pod_problems(fleet, pods, events)
