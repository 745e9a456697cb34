"""What the objects say: a fleet's name, kind, worker groups, Secrets and runtime config, read from the
objects about to be applied (or from the cluster), never re-derived from the values. So every check is
as right for objects the Helm chart rendered as for `rollfleet render`'s.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

GPU = "nvidia.com/gpu"
TOPS = ("RayJob", "RayCluster")
# all rollfleet creates: all `down` deletes
CREATED_KINDS = ("RayJob", "RayCluster", "ConfigMap", "NetworkPolicy", "PodMonitor", "PrometheusRule")
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
HELM_RELEASE = "meta.helm.sh/release-name"
HELM_NAMESPACE = "meta.helm.sh/release-namespace"


def ref(obj: dict) -> str:
    return f"{obj['kind']} {obj['metadata'].get('namespace', '')}/{obj['metadata']['name']}"


def instance_selector(name: str) -> str:
    """render.selector as a label selector string."""
    from rollfleet.render import selector

    return ",".join(f"{k}={v}" for k, v in selector(name).items())


def down_selector(name: str) -> str:
    from rollfleet.render import MANAGED_BY

    return f"app.kubernetes.io/instance={name},{MANAGED_BY_LABEL}={MANAGED_BY}"


def helm_release(obj: dict) -> tuple[str, str] | None:
    """(release, namespace) when a Helm release owns `obj` (Helm's labels or annotations), else None."""
    meta = obj.get("metadata") or {}
    labels, annotations = meta.get("labels") or {}, meta.get("annotations") or {}
    if labels.get(MANAGED_BY_LABEL) != "Helm" and HELM_RELEASE not in annotations:
        return None
    return (annotations.get(HELM_RELEASE) or labels.get("app.kubernetes.io/instance") or "?",
            annotations.get(HELM_NAMESPACE) or meta.get("namespace", ""))


def cluster_spec(obj: dict) -> dict:
    spec = obj.get("spec") or {}
    return (spec.get("rayClusterSpec") or {}) if obj["kind"] == "RayJob" else spec


def quantity(value: Any) -> int:
    """An integer resource count as the API stores it (`2`, `"2"`); anything else counts as 0."""
    try:
        return int(str(value))
    except ValueError:
        return 0


def pod_gpus(pod_spec: dict) -> int:
    """nvidia.com/gpu a pod holds: per container the larger of request and limit, summed."""
    total = 0
    for c in pod_spec.get("containers") or []:
        resources = c.get("resources") or {}
        total += max(quantity((resources.get(k) or {}).get(GPU, 0)) for k in ("requests", "limits"))
    return total


@dataclass(frozen=True)
class Group:
    """One worker group as the object states it."""

    name: str  # groupName
    component: str  # the pods' app.kubernetes.io/component label
    pods: int  # replicas × numOfHosts
    gpus: int  # nvidia.com/gpu per pod
    node_selector: dict[str, str]
    tolerations: tuple[dict, ...]

    @property
    def field(self) -> str:
        """The values key that shapes this group (for messages)."""
        return f"pools.{self.name}" if self.name in ("trainer", "inference", "colocated") else f"workerGroupSpecs[{self.name}]"


def groups_of(obj: dict) -> list[Group]:
    out = []
    for g in cluster_spec(obj).get("workerGroupSpecs") or []:
        template = g.get("template") or {}
        spec = template.get("spec") or {}
        labels = (template.get("metadata") or {}).get("labels") or {}
        out.append(Group(g.get("groupName", "?"), labels.get("app.kubernetes.io/component", g.get("groupName", "?")),
                         int(g.get("replicas", 0)) * int(g.get("numOfHosts", 1)), pod_gpus(spec),
                         dict(spec.get("nodeSelector") or {}), tuple(spec.get("tolerations") or ())))
    return out


def pod_specs(obj: dict) -> list[tuple[str, dict]]:
    """(group, pod spec) of the head and every worker group."""
    cluster = cluster_spec(obj)
    out = [("head", ((cluster.get("headGroupSpec") or {}).get("template") or {}).get("spec") or {})]
    out += [(g.get("groupName", "?"), (g.get("template") or {}).get("spec") or {})
            for g in cluster.get("workerGroupSpecs") or []]
    return out


RAY_AUTH_KEY = "auth_token"  # the key KubeRay reads in rayAuth.secretName's Secret


@dataclass(frozen=True)
class SecretRef:
    """A Secret the fleet needs: its key (None: an image pull secret, any keys) and the values fields
    that name the Secret and the key (`key_field` None: KubeRay fixes the key)."""

    name: str
    key: str | None
    name_field: str
    key_field: str | None = None


def secret_refs(objects: list[dict]) -> list[SecretRef]:
    """Every Secret the fleet references, each Secret/key once: the pods' env `secretKeyRef`s
    (model.hfTokenSecret, secretEnv), `imagePullSecrets`, and the Ray auth token (rayAuth.secretName)."""
    seen: dict[tuple[str, str | None], SecretRef] = {}

    def add(ref: SecretRef) -> None:
        seen.setdefault((ref.name, ref.key), ref)

    for obj in objects:
        if obj["kind"] not in TOPS:
            continue
        auth = cluster_spec(obj).get("authOptions") or {}
        if auth.get("secretName"):
            add(SecretRef(auth["secretName"], RAY_AUTH_KEY, "rayAuth.secretName"))
        for _, spec in pod_specs(obj):
            for i, s in enumerate(spec.get("imagePullSecrets") or []):
                add(SecretRef(s.get("name", ""), None, f"image.pullSecrets[{i}]"))
            for c in spec.get("containers") or []:
                for env in c.get("env") or []:
                    key_ref = (env.get("valueFrom") or {}).get("secretKeyRef")
                    if key_ref:
                        field = "model.hfTokenSecret" if env.get("name") == "HF_TOKEN" else f"secretEnv.{env.get('name')}"
                        add(SecretRef(key_ref.get("name", ""), key_ref.get("key"), f"{field}.name", f"{field}.key"))
    return list(seen.values())


@dataclass(frozen=True)
class Fleet:
    """A fleet as its RayJob/RayCluster (and ConfigMap) say."""

    name: str
    namespace: str
    kind: str  # RayJob | RayCluster
    groups: tuple[Group, ...]
    submission_mode: str  # the RayJob's (KubeRay's default K8sJobMode); "" for a RayCluster
    config: str | None  # the runtime-config ConfigMap the head mounts
    init_seconds: float | None  # timeouts.initSeconds from that runtime config, when readable

    @property
    def top(self) -> str:
        return f"{self.kind} {self.namespace}/{self.name}"

    @property
    def selector(self) -> str:
        return instance_selector(self.name)

    @property
    def want(self) -> dict[str, int]:
        """Pods per component when the fleet is up."""
        out = {"head": 1}
        for g in self.groups:
            out[g.component] = out.get(g.component, 0) + g.pods
        return out


def config_name(top: dict) -> str | None:
    """The ConfigMap the head mounts as `fleet-config` (the runtime config)."""
    for _, spec in pod_specs(top)[:1]:
        for volume in spec.get("volumes") or []:
            if volume.get("name") == "fleet-config":
                return (volume.get("configMap") or {}).get("name")
    return None


def init_seconds(configmap: dict | None) -> float | None:
    try:
        return float(json.loads(configmap["data"]["fleet.json"])["timeouts"]["initSeconds"])
    except (TypeError, KeyError, ValueError):
        return None


def fleet_of(top: dict, configmap: dict | None = None) -> Fleet:
    meta = top["metadata"]
    mode = ((top.get("spec") or {}).get("submissionMode") or "K8sJobMode") if top["kind"] == "RayJob" else ""
    return Fleet(meta["name"], meta.get("namespace", ""), top["kind"], tuple(groups_of(top)), mode,
                 config_name(top), init_seconds(configmap))


def rendered_fleet(objects: list[dict]) -> Fleet:
    """The fleet of rendered objects: one RayJob or RayCluster, and the ConfigMap it mounts."""
    (top,) = [o for o in objects if o["kind"] in TOPS]
    name = config_name(top)
    configmap = next((o for o in objects if o["kind"] == "ConfigMap" and o["metadata"]["name"] == name), None)
    return fleet_of(top, configmap)


def live_fleet(kube, name: str, namespace: str) -> Fleet | None:
    """The fleet named `name` on the cluster: its RayJob, else its RayCluster; None when neither exists."""
    from rollfleet.deploy.client import NotServed

    for kind in TOPS:
        try:
            top = kube.get(kind, name, namespace)
        except NotServed:
            continue
        if top is not None:
            cm = config_name(top)
            return fleet_of({**top, "kind": kind}, kube.get("ConfigMap", cm, namespace) if cm else None)
    return None
