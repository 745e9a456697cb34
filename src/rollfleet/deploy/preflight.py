"""Preflight: read-only checks of the objects about to be applied against the cluster. Every check runs;
each failure is one line saying what, where and what to change; a check RBAC does not allow is a warning.

- KubeRay's CRDs are served at ray.io/v1, and its operator runs (its Deployment); the Prometheus
  Operator's PodMonitor / PrometheusRule when the objects hold one;
- the namespace exists; every Secret the pods reference exists and has its key;
- the worker groups fit on the GPU nodes (read from the objects: replicas, nodeSelector, tolerations,
  GPU limits), with the taints and GPU products that exclude nodes named;
- nothing is in the way: an object of a Helm release, or a RayJob that already ran.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from rollfleet.deploy.client import KUBERAY_INSTALL, MONITORING_FIX, Kube, NotServed, api_message
from rollfleet.deploy.fleet import GPU, Fleet, Group, helm_release, pod_gpus, quantity, ref, secret_refs
from rollfleet.spec import KUBERAY_VERSION

# The KubeRay operator's Deployment as KubeRay v1.7.0's Helm chart labels it, and as its kustomize manifests
# (ray-operator/config/manager) do; its pods carry the component label under both.
OPERATOR_SELECTORS = ("app.kubernetes.io/name=kuberay-operator", "app.kubernetes.io/component=kuberay-operator")
CHECK_OPERATOR = "kubectl get pods -A -l app.kubernetes.io/component=kuberay-operator"
NODE_STATE_TAINTS = "node.kubernetes.io/"  # not-ready, unreachable, unschedulable, ...: the node's state
FINISHED = ("Complete", "Failed")  # jobDeploymentStatus of a RayJob that will not run again


# ---- GPU arithmetic (pure) ----------------------------------------------------------------------

@dataclass(frozen=True)
class NodeInfo:
    name: str
    labels: dict[str, str]
    gpus: int  # allocatable nvidia.com/gpu
    used: int = 0  # nvidia.com/gpu held by pods of other workloads on this node
    taints: tuple[dict, ...] = ()
    ready: bool = True
    cordoned: bool = False

    @property
    def free(self) -> int:
        return max(self.gpus - self.used, 0)

    @property
    def schedulable(self) -> bool:
        return self.ready and not self.cordoned


@dataclass(frozen=True)
class GroupFit:
    group: Group
    nodes: tuple[str, ...]  # nodes a pod of this group may land on (selector, taints, schedulable)
    free: int  # free GPUs on those nodes, before any pod of this fleet is placed
    placed: int  # pods that fit: each needs group.gpus free GPUs on one node
    shared: bool  # some of those nodes can also take another group's pods
    excluded: str = ""  # why nodes with the group's labels are not among `nodes`, or why none has them

    @property
    def need(self) -> int:
        return self.group.pods * self.group.gpus

    @property
    def ok(self) -> bool:
        return self.placed >= self.group.pods


def tolerates(tolerations, taint: dict) -> bool:
    """Kubernetes toleration matching, for the effects that keep a pod off a node."""
    if taint.get("effect") not in ("NoSchedule", "NoExecute"):
        return True
    for t in tolerations:
        if t.get("effect") and t["effect"] != taint.get("effect"):
            continue
        if t.get("operator", "Equal") == "Exists":
            if not t.get("key") or t["key"] == taint.get("key"):
                return True
        elif t.get("key") == taint.get("key") and (t.get("value") or "") == (taint.get("value") or ""):
            return True
    return False


def labelled(group: Group, node: NodeInfo) -> bool:
    return group.node_selector.items() <= node.labels.items()


def eligible(group: Group, node: NodeInfo) -> bool:
    return node.schedulable and labelled(group, node) and all(tolerates(group.tolerations, t) for t in node.taints)


def taint_text(taint: dict) -> str:
    value = f"={taint['value']}" if taint.get("value") else ""
    return f"{taint.get('key')}{value}:{taint.get('effect')}"


def exclusions(group: Group, nodes: list[NodeInfo]) -> str:
    """Why nodes are not candidates for `group`: the taints (key, value, effect) and node states that
    exclude nodes with its labels, or, when no node has its labels, the GPU products nodes do have."""
    selector = ",".join(f"{k}={v}" for k, v in group.node_selector.items()) or "(any node)"
    with_labels = [n for n in nodes if labelled(group, n)]
    products = Counter(n.labels.get("nvidia.com/gpu.product", "(no nvidia.com/gpu.product label)")
                       for n in nodes if n.gpus and n not in with_labels)
    have = ", ".join(f"{p} ({c} node{'s' * (c != 1)})" for p, c in sorted(products.items()))
    if not with_labels:
        return (f"no node has the labels {selector}; GPU products the nodes have: {have or 'none'}; set "
                f"{group.field}.gpuProduct to one of them (null: any GPU node) or change {group.field}.nodeSelector")
    reasons: dict[str, list[str]] = {}
    for n in with_labels:
        if not n.ready:
            reasons.setdefault("not Ready", []).append(n.name)
        if n.cordoned:
            reasons.setdefault("cordoned", []).append(n.name)
        for t in n.taints:
            if not tolerates(group.tolerations, t) and not (t.get("key") or "").startswith(NODE_STATE_TAINTS):
                reasons.setdefault(f"taint {taint_text(t)}", []).append(n.name)
    if not reasons:
        return ""
    count = len({name for names in reasons.values() for name in names})
    listed = "; ".join(f"{why} ({', '.join(names)})" for why, names in reasons.items())
    fixes = []
    taints = [why for why in reasons if why.startswith("taint ")]
    if taints:
        fixes.append(f"tolerate {'them' if len(taints) > 1 else 'it'} in {group.field}.tolerations (key, operator "
                     f"Equal, value, effect) or remove the taint from the nodes")
    if "not Ready" in reasons:
        fixes.append("a node's kubelet must report Ready (kubectl describe node <node>)")
    if "cordoned" in reasons:
        fixes.append("kubectl uncordon <node>")
    elsewhere = f"; GPU nodes without these labels have: {have}" if have else ""
    return (f"{count} node{'s' * (count != 1)} with the labels {selector} "
            f"{'are' if count != 1 else 'is'} excluded: {listed}; {'; '.join(fixes)}{elsewhere}")


def plan_gpus(groups: list[Group], nodes: list[NodeInfo]) -> list[GroupFit]:
    """Place every group's pods on `nodes` (best fit, the group with the fewest candidate nodes first;
    groups share nodes), and report per group what it needs against what fits."""
    free = {n.name: n.free for n in nodes}
    candidates = {g.name: [n for n in nodes if eligible(g, n)] for g in groups}
    placed = dict.fromkeys(candidates, 0)
    for g in sorted(groups, key=lambda g: len(candidates[g.name])):
        for _ in range(g.pods):
            fitting = [n.name for n in candidates[g.name] if free[n.name] >= g.gpus]
            if not fitting:
                break
            best = min(fitting, key=lambda n: (free[n], n))  # best fit keeps the emptiest nodes whole
            free[best] -= g.gpus
            placed[g.name] += 1
    fits = []
    for g in groups:
        mine = {n.name for n in candidates[g.name]}
        others = set().union(*({n.name for n in candidates[o.name]} for o in groups if o.name != g.name))
        fits.append(GroupFit(g, tuple(sorted(mine)), sum(n.free for n in candidates[g.name]), placed[g.name],
                             bool(mine & others), exclusions(g, nodes)))
    return fits


def gpu_table(fits: list[GroupFit]) -> str:
    rows = [("pool", "node selector", "need", "matching nodes", "free GPUs there", "pods that fit", "")]
    for f in fits:
        g = f.group
        rows.append((g.name, ",".join(f"{k}={v}" for k, v in g.node_selector.items()) or "(any node)",
                     f"{g.pods} pod{'s' * (g.pods != 1)} × {g.gpus} = {f.need} GPU",
                     str(len(f.nodes)), str(f.free), f"{f.placed}/{g.pods}", "ok" if f.ok else "NOT ENOUGH"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def gpu_problem(f: GroupFit) -> str:
    g = f.group
    where = f"{len(f.nodes)} matching node{'s' * (len(f.nodes) != 1)}"
    shared = " (shared with the other pool, whose pods were placed too)" if f.shared else ""
    line = (f"{g.field}: needs {g.pods} pod(s) with {g.gpus} free {GPU} each on one node, "
            f"but only {f.placed} fit on {where}{shared} ({f.free} GPUs free there)")
    if f.nodes:
        line += f"; free GPUs there, add nodes, or lower {g.field}.nodes / {g.field}.gpusPerNode"
        return line + (f"; also, {f.excluded}" if f.excluded else "")
    return line + f"; {f.excluded or f'no schedulable node matches: check {g.field}.nodeSelector and tolerations'}"


def node_info(node: dict, used: int) -> NodeInfo:
    status, spec = node.get("status") or {}, node.get("spec") or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    return NodeInfo(node["metadata"]["name"], node["metadata"].get("labels") or {},
                    quantity((status.get("allocatable") or {}).get(GPU, 0)), used,
                    tuple(spec.get("taints") or ()), ready, bool(spec.get("unschedulable")))


def gpu_fits(kube: Kube, fleet: Fleet) -> list[GroupFit]:
    used: dict[str, int] = {}
    for pod in kube.list("Pod", fields="status.phase!=Succeeded,status.phase!=Failed"):
        meta = pod["metadata"]
        labels = meta.get("labels") or {}
        ours = labels.get("app.kubernetes.io/name") == "rollfleet" and meta.get("namespace") == fleet.namespace
        if ours and labels.get("app.kubernetes.io/instance") == fleet.name:
            continue  # this fleet's own pods (a re-deploy) do not count against it
        node = (pod.get("spec") or {}).get("nodeName")
        if node:
            used[node] = used.get(node, 0) + pod_gpus(pod.get("spec") or {})
    nodes = [node_info(n, used.get(n["metadata"]["name"], 0)) for n in kube.list("Node")]
    return plan_gpus(list(fleet.groups), nodes)


# ---- the checks against the cluster -------------------------------------------------------------

@dataclass
class Report:
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    fits: list[GroupFit] = field(default_factory=list)
    live: dict[str, dict | None] = field(default_factory=dict)  # ref -> the object on the cluster now


def crds_served(kube: Kube, fleet: Fleet) -> list[str]:
    groups = {g["name"]: [v["version"] for v in g["versions"]] for g in kube.raw("/apis")["groups"]}
    needed = ["rayjobs", "rayclusters"] if fleet.kind == "RayJob" else ["rayclusters"]
    if "v1" not in groups.get("ray.io", []):
        have = (f"the ray.io API group serves only {', '.join(groups['ray.io'])} (an older KubeRay)"
                if groups.get("ray.io") else "the ray.io API group is not served: KubeRay's CRDs are not installed")
        return [f"KubeRay CRDs {', '.join(p + '.ray.io' for p in needed)} are not served at ray.io/v1 ({have}); "
                f"install the KubeRay operator {KUBERAY_VERSION} with its CRDs: {KUBERAY_INSTALL}"]
    served = {r["name"] for r in kube.raw("/apis/ray.io/v1")["resources"]}
    return [f"KubeRay CRD {p}.ray.io is not served at ray.io/v1; install the KubeRay operator {KUBERAY_VERSION} with "
            f"its CRDs: "
            f"{KUBERAY_INSTALL}" for p in needed if p not in served]


def monitoring_served(kube: Kube, objects: list[dict]) -> list[str]:
    """The Prometheus Operator's kinds the objects hold (monitoring.podMonitor / alerts) are served."""
    wanted = sorted({o["kind"] for o in objects if o["apiVersion"] == "monitoring.coreos.com/v1"})
    if not wanted:
        return []
    groups = {g["name"]: [v["version"] for v in g["versions"]] for g in kube.raw("/apis")["groups"]}
    served = ({r["kind"] for r in kube.raw("/apis/monitoring.coreos.com/v1")["resources"]}
              if "v1" in groups.get("monitoring.coreos.com", []) else set())
    missing = [k for k in wanted if k not in served]
    return [f"{', '.join(missing)} (monitoring.coreos.com/v1) not served by the cluster; {MONITORING_FIX}"] if missing else []


def operator_running(kube: Kube, fleet: Fleet, report: Report) -> None:
    """The KubeRay operator's Deployment exists (any namespace) and has an available replica."""
    from kubernetes.dynamic.exceptions import ForbiddenError

    try:
        found = {d["metadata"]["uid"]: d for selector in OPERATOR_SELECTORS
                 for d in kube.list("Deployment", labels=selector)}
        deployments = sorted(found.values(), key=lambda d: (d["metadata"]["namespace"], d["metadata"]["name"]))
    except (ForbiddenError, NotServed) as exc:
        why = api_message(exc) if isinstance(exc, ForbiddenError) else str(exc)
        report.warnings.append(f"KubeRay operator not checked: {why}; the wait stops early if the {fleet.kind} gets "
                               f"no status; check it yourself: {CHECK_OPERATOR}")
        return
    if not deployments:
        report.problems.append(
            f"no KubeRay operator: no Deployment labelled {' or '.join(OPERATOR_SELECTORS)} in any namespace, so "
            f"nothing would "
            f"create the Ray cluster of {fleet.top}; install it: {KUBERAY_INSTALL}; check: {CHECK_OPERATOR} "
            f"(an operator deployed another way: pass --skip-operator-check)")
        return
    if not any(int((d.get("status") or {}).get("availableReplicas") or 0) >= 1 for d in deployments):
        names = ", ".join(f"{d['metadata']['namespace']}/{d['metadata']['name']}" for d in deployments)
        d = deployments[0]["metadata"]
        report.warnings.append(f"KubeRay operator Deployment {names} has no available replica: {fleet.top} gets no "
                               f"status until it runs; check: kubectl -n {d['namespace']} get deployment {d['name']}; "
                               f"kubectl -n {d['namespace']} logs deployment/{d['name']}")


def in_the_way(objects: list[dict], live: dict[str, dict | None], replace: bool) -> list[str]:
    """Objects a Helm release owns; a RayJob that already ran (re-applying does not rerun it)."""
    problems = []
    for obj in objects:
        current = live.get(ref(obj))
        if current is None:
            continue
        owner = helm_release(current)
        if owner:
            release, ns = owner
            problems.append(
                f"{ref(obj)} belongs to Helm release {release} (namespace {ns}); rollfleet does not change a Helm "
                f"release's objects: change it with `helm upgrade {release} charts/rollfleet -n {ns} -f <values>`, "
                f"remove the release first (`helm uninstall {release} -n {ns}`), or deploy under another `name`")
            continue
        status = current.get("status") or {}
        if obj["kind"] == "RayJob" and status.get("jobDeploymentStatus") in FINISHED and not replace:
            meta = obj["metadata"]
            problems.append(
                f"{ref(obj)} has already run (jobDeploymentStatus {status['jobDeploymentStatus']}, jobStatus "
                f"{status.get('jobStatus') or '-'}): a RayJob runs once, so applying it again does not rerun it; "
                f"delete it first (`rollfleet down {meta['name']} -n {meta['namespace']}`) and deploy again, or "
                f"deploy with --replace to do both")
    return problems


def preflight(kube: Kube, objects: list[dict], fleet: Fleet, check_gpus: bool = True, check_operator: bool = True,
              replace: bool = False) -> Report:
    """Reads only. Problems mean nothing may be applied."""
    from kubernetes.dynamic.exceptions import ForbiddenError

    report = Report()
    ns = fleet.namespace
    report.problems += crds_served(kube, fleet) + monitoring_served(kube, objects)
    if check_operator and not report.problems:
        operator_running(kube, fleet, report)

    namespace_ok = True
    try:
        if kube.get("Namespace", ns) is None:
            namespace_ok = False
            report.problems.append(f"namespace {ns!r} does not exist; create it (kubectl create namespace {ns}) "
                                   f"or set `namespace:` in the values (or -n)")
    except ForbiddenError as exc:
        report.warnings.append(f"namespace {ns!r} not checked: {api_message(exc)}")

    for r in secret_refs(objects) if namespace_ok else []:
        try:
            secret = kube.get("Secret", r.name, ns)
        except ForbiddenError as exc:
            report.warnings.append(f"Secret {ns}/{r.name} ({r.name_field}) not checked: {api_message(exc)}")
            continue
        # Kubernetes cannot list a Secret's keys without reading it: the values are dropped here at once.
        keys = None if secret is None else sorted(secret.get("data") or {})
        if keys is None:
            fix = (f"kubectl -n {ns} create secret generic {r.name} --from-file={r.key}=<a file holding the value>"
                   if r.key else f"kubectl -n {ns} create secret docker-registry {r.name} --docker-server=<registry> "
                   f"--docker-username=<user> --docker-password=<password>")
            report.problems.append(f"Secret {ns}/{r.name} ({r.name_field}) does not exist; create it: {fix}")
        elif r.key and r.key not in keys:
            fix = (f"set {r.key_field} to one of them or add the key" if r.key_field else
                   f"add the key {r.key} (KubeRay reads that one)")
            report.problems.append(f"Secret {ns}/{r.name} has no key {r.key!r} ({r.key_field or r.name_field}); its "
                                   f"keys: {', '.join(keys) or '(none)'}; {fix}")

    if namespace_ok:
        for obj in objects:
            try:
                report.live[ref(obj)] = kube.get(obj["kind"], obj["metadata"]["name"], ns)
            except NotServed:  # reported above: ray.io/v1 or monitoring.coreos.com/v1 is not served
                report.live[ref(obj)] = None
            except ForbiddenError as exc:
                report.warnings.append(f"{ref(obj)} not read: {api_message(exc)}")
        report.problems += in_the_way(objects, report.live, replace)

    if check_gpus:
        try:
            report.fits = gpu_fits(kube, fleet)
            report.problems += [gpu_problem(f) for f in report.fits if not f.ok]
        except ForbiddenError as exc:
            report.warnings.append(f"GPU capacity not checked: {api_message(exc)} (pass --skip-gpu-check to silence)")
    return report
