"""The parts of a pod spec that values carry: tolerations, affinity, volumes, Secret references.

They are Kubernetes' own shapes (camelCase keys as in a pod spec), typed so that the chart's schema
refuses what the API server would, and dumped without the keys left out (`Fragment`).
"""

from __future__ import annotations

from typing import Iterable, Literal

from pydantic import Field, model_validator

from rollfleet.fields import (DNS1123_LABEL, Fragment, LabelKey, LabelValue, Labels, Model, Namespace, ObjectName,
                              SecretKey, integer, text)

_LEFT_OUT = {"enum": [None, ""]}


class Toleration(Fragment):
    key: LabelKey | None = None
    operator: Literal["Exists", "Equal"] = "Exists"
    value: LabelValue | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None

    model_config = {"json_schema_extra": {"allOf": [
        # Kubernetes: operator Exists takes no value; Equal needs a key (an empty key matches every taint)
        {"if": {"properties": {"operator": {"const": "Exists"}}},
         "then": {"properties": {"value": _LEFT_OUT}}},
        {"if": {"properties": {"operator": {"const": "Equal"}}, "required": ["operator"]},
         "then": {"required": ["key"], "properties": {"key": {"type": "string", "minLength": 1}}}},
    ]}}

    @model_validator(mode="after")
    def _operator_rules(self) -> Toleration:
        if self.operator == "Exists" and self.value:
            raise ValueError("operator Exists matches any value; remove value or set operator: Equal")
        if self.operator == "Equal" and not self.key:
            raise ValueError("operator Equal needs a key; set key or use operator: Exists")
        return self


class SecretRef(Model):
    """An existing Secret and the key in it; referenced through `secretKeyRef`, never read."""

    name: ObjectName
    key: SecretKey = "token"


# --- affinity (core/v1 Affinity) ------------------------------------------------------------------


class LabelRequirement(Fragment):
    key: LabelKey
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[LabelValue] | None = None


class NodeRequirement(Fragment):
    key: LabelKey
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]
    values: list[LabelValue] | None = None


class NodeSelectorTerm(Fragment):
    match_expressions: list[NodeRequirement] | None = None
    match_fields: list[NodeRequirement] | None = None


class NodeSelector(Fragment):
    node_selector_terms: list[NodeSelectorTerm]


class PreferredSchedulingTerm(Fragment):
    weight: integer(1, 100)
    preference: NodeSelectorTerm


class NodeAffinity(Fragment):
    required_during_scheduling_ignored_during_execution: NodeSelector | None = None
    preferred_during_scheduling_ignored_during_execution: list[PreferredSchedulingTerm] | None = None


class LabelSelector(Fragment):
    match_labels: Labels | None = None
    match_expressions: list[LabelRequirement] | None = None


class PodAffinityTerm(Fragment):
    topology_key: LabelKey
    label_selector: LabelSelector | None = None
    namespaces: list[Namespace] | None = None
    namespace_selector: LabelSelector | None = None
    match_label_keys: list[LabelKey] | None = None
    mismatch_label_keys: list[LabelKey] | None = None


class WeightedPodAffinityTerm(Fragment):
    weight: integer(1, 100)
    pod_affinity_term: PodAffinityTerm


class PodAffinity(Fragment):
    required_during_scheduling_ignored_during_execution: list[PodAffinityTerm] | None = None
    preferred_during_scheduling_ignored_during_execution: list[WeightedPodAffinityTerm] | None = None


class Affinity(Fragment):
    """A pod's `affinity`, as in a pod spec (node affinity, pod affinity and anti-affinity)."""

    node_affinity: NodeAffinity | None = None
    pod_affinity: PodAffinity | None = None
    pod_anti_affinity: PodAffinity | None = None


# --- volumes --------------------------------------------------------------------------------------

VolumeName = text(DNS1123_LABEL, "not a volume name (DNS-1123 label); use lowercase letters, "
                  "digits and '-', at most 63 characters; dshm and fleet-config are rollfleet's own",
                  max_length=63)
# /dev/shm and the runtime config directory are rollfleet's own mounts.
MountPath = text(r"/(?:[^:\x00-\x1f]*)", "not a mount path; write an absolute path without ':' or control "
                 "characters, outside /dev/shm and /etc/rollfleet", max_length=4096)
SubPath = text(r"[^/:\x00-\x1f][^:\x00-\x1f]*", "not a sub-path; write a relative path inside the volume, "
               "without '..', ':' or control characters", max_length=4096)
Group = Literal["head", "trainer", "inference"]  # the colocated group mounts what trainer or inference mounts
RESERVED_MOUNTS = ("/dev/shm", "/etc/rollfleet")


class Volume(Fragment):
    """A PersistentVolumeClaim mounted into the Ray containers (e.g. the Hugging Face cache, checkpoints)."""

    name: VolumeName
    claim_name: ObjectName
    """The existing PersistentVolumeClaim (ReadWriteMany when more than one pod mounts it)."""
    mount_path: MountPath
    read_only: bool | None = None
    sub_path: SubPath | None = None
    groups: list[Group] | None = Field(default=None, min_length=1)
    """The pods that mount it: head, trainer, inference; left out: all of them."""

    @model_validator(mode="after")
    def _own_names(self) -> Volume:
        if self.name in ("dshm", "fleet-config"):
            raise ValueError(f"{self.name} is rollfleet's own volume; choose another name")
        if any(self.mount_path.rstrip("/") == m or self.mount_path.startswith(m + "/") for m in RESERVED_MOUNTS):
            raise ValueError(f"{self.mount_path} is rollfleet's own mount; mount elsewhere")
        if self.sub_path and ".." in self.sub_path.split("/"):
            raise ValueError("subPath leaves the volume ('..'); write a path inside it")
        return self

    model_config = {"json_schema_extra": {"allOf": [
        {"properties": {"name": {"not": {"enum": ["dshm", "fleet-config"]}}}},
        {"properties": {"mountPath": {"not": {"pattern": r"^/(dev/shm|etc/rollfleet)(/.*)?$"}}}},
        {"properties": {"subPath": {"not": {"pattern": r"(^|/)\.\.(/|$)"}}}},
    ]}}

    def mounted_in(self, roles: Iterable[str]) -> bool:
        """Whether a pod with these roles mounts it: head, or a worker group's Ray resources (the
        colocated group is trainer and inference, so it mounts what either mounts)."""
        return self.groups is None or bool(set(roles) & set(self.groups))

