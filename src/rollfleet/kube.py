"""`rollfleet deploy | status | logs | down`: preflight, server-side apply, wait, delete.

deploy = render → preflight (every check runs; any failure: one error line each, nothing written,
exit 2) → server-side apply as field manager `rollfleet` (a dry run of every object first, so a
conflict or a rejected object also writes nothing, exit 2) → wait with a progress line until the
fleet is ready or the timeout (default `timeouts.initSeconds`) passes (exit 1, with the reasons read
from pods and events). A second deploy with the same values is a server-side-apply no-op: "unchanged".

Everything goes through the `kubernetes` client's dynamic API: no kubectl, no helm, no
kuberay-python-client (not on PyPI). The client is imported inside functions so `rollfleet --help`
stays fast.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

FIELD_MANAGER = "rollfleet"
GPU = "nvidia.com/gpu"
GPU_TOLERATION = {"key": GPU, "operator": "Exists", "effect": "NoSchedule"}  # as the templates render it
API_VERSIONS = {"ConfigMap": "v1", "RayJob": "ray.io/v1", "RayCluster": "ray.io/v1", "Namespace": "v1",
                "Secret": "v1", "Node": "v1", "Pod": "v1", "Event": "v1", "NetworkPolicy": "networking.k8s.io/v1"}
CREATED_KINDS = ("RayJob", "RayCluster", "ConfigMap", "NetworkPolicy")  # all rollfleet creates: all `down` deletes
KUBERAY_INSTALL = ("helm install kuberay-operator kuberay/kuberay-operator --version 1.7.0 "
                   "(helm repo add kuberay https://ray-project.github.io/kuberay-helm/)")
NOTHING_APPLIED = 2  # preflight or dry-run apply failed: the cluster was not touched
FAILED = 1  # applied, but the fleet failed or the wait timed out
POLL_SECONDS = 2.0
HEARTBEAT_SECONDS = 30.0  # reprint the progress line this often even when nothing changed
REQUEST_TIMEOUT = 30  # seconds, each API request


class KubeError(Exception):
    """Cannot talk to the cluster at all (no kubeconfig, unreachable API server)."""


class NotServed(KubeError):
    """The cluster does not serve a kind rollfleet needs (KubeRay's CRDs are not installed)."""


def err(line: str) -> None:
    print(f"error: {line}", file=sys.stderr, flush=True)


def say(line: str) -> None:
    print(line, flush=True)


# ---- the CLI ------------------------------------------------------------------------------------

def add_commands(sub, values_args, func) -> None:
    def common(p):
        values_args(p)
        p.add_argument("--context", help="kubeconfig context (default: the current context)")
        p.add_argument("--kubeconfig", help="kubeconfig file (default: $KUBECONFIG or ~/.kube/config; "
                                            "inside a pod without one: its service account)")
        p.set_defaults(func=func)

    p = sub.add_parser("deploy", help="preflight, server-side apply and wait for the fleet on a cluster")
    common(p)
    p.add_argument("--wait", choices=("ready", "complete", "none"), default="ready",
                   help="ready: cluster up and job running (default); complete: the RayJob succeeded; none: "
                        "return after applying")
    p.add_argument("--timeout", type=float, help="seconds to wait (default: timeouts.initSeconds)")
    p.add_argument("--force-conflicts", action="store_true",
                   help="take over fields another field manager owns (server-side apply force)")
    p.add_argument("--skip-gpu-check", action="store_true",
                   help="skip the GPU capacity check (node pools that autoscale from zero)")
    p.set_defaults(kube_command="deploy")

    p = sub.add_parser("status", help="show the fleet's objects, pools and problems (optionally wait)")
    common(p)
    p.add_argument("--wait", choices=("ready", "complete"), help="wait until ready / the RayJob succeeded")
    p.add_argument("--timeout", type=float, help="seconds to wait (default: timeouts.initSeconds)")
    p.set_defaults(kube_command="status")

    p = sub.add_parser("logs", help="print the RayJob submitter's logs (the job's output) or a pool's")
    common(p)
    p.add_argument("--component", choices=("submitter", "head", "trainer", "inference"),
                   help="default: submitter for a K8sJobMode RayJob, otherwise head")
    p.add_argument("--tail", type=int, default=100, help="lines per pod (default 100)")
    p.set_defaults(kube_command="logs")

    p = sub.add_parser("down", help="delete this instance's RayJob/RayCluster/ConfigMap (by rollfleet labels)")
    common(p)
    p.add_argument("--timeout", type=float, default=120, help="seconds to wait until they are gone (default 120)")
    p.set_defaults(kube_command="down")


def main(args) -> int:
    from kubernetes.dynamic.exceptions import DynamicApiError
    from urllib3.exceptions import HTTPError

    from rollfleet.render import load_values

    spec = load_values(args.values, args.set)
    try:
        kube = connect(args.kubeconfig, args.context)
        return {"deploy": deploy, "status": status, "logs": logs, "down": down}[args.kube_command](kube, spec, args)
    except KubeError as exc:
        err(str(exc))
        return NOTHING_APPLIED
    except DynamicApiError as exc:
        err(f"the API server answered {exc.status}: {api_message(exc)}")
        return FAILED
    except HTTPError as exc:
        err(f"lost the API server: {exc}")
        return FAILED


# ---- the API, as plain dicts --------------------------------------------------------------------

def api_message(exc) -> str:
    try:
        return json.loads(exc.body)["message"]
    except (TypeError, ValueError, KeyError):
        return str(exc.body or exc.reason)


class Kube:
    """The dynamic client, returning plain dicts. Discovery is cached per process only, so CRDs
    installed a moment ago are seen."""

    def __init__(self, api_client, where: str):
        from kubernetes.dynamic import DynamicClient

        self._cache = tempfile.TemporaryDirectory(prefix="rollfleet-discovery-")
        self.dyn = DynamicClient(api_client, cache_file=os.path.join(self._cache.name, "discovery.json"))
        self.where = where

    def _call(self, fn, **kwargs) -> Any:
        resp = fn(serialize=False, _request_timeout=REQUEST_TIMEOUT, **kwargs)
        return json.loads(resp.data)

    def raw(self, path: str) -> dict:
        return self._call(lambda **kw: self.dyn.request("get", path, **kw))

    def resource(self, kind: str):
        from kubernetes.dynamic.exceptions import ResourceNotFoundError

        try:
            return self.dyn.resources.get(api_version=API_VERSIONS[kind], kind=kind)
        except ResourceNotFoundError:
            raise NotServed(f"{self.where} does not serve {kind} ({API_VERSIONS[kind]}); install the KubeRay "
                            f"operator v1.7.0 with its CRDs: {KUBERAY_INSTALL}") from None

    def get(self, kind: str, name: str, namespace: str | None = None) -> dict | None:
        from kubernetes.dynamic.exceptions import NotFoundError

        try:
            return self._call(self.resource(kind).get, name=name, namespace=namespace)
        except NotFoundError:
            return None

    def list(self, kind: str, namespace: str | None = None, labels: str | None = None,
             fields: str | None = None) -> list[dict]:
        return self._call(self.resource(kind).get, namespace=namespace, label_selector=labels,
                          field_selector=fields)["items"]

    def apply(self, obj: dict, force: bool, dry_run: bool = False) -> dict:
        return self._call(self.resource(obj["kind"]).server_side_apply, body=obj,
                          namespace=obj["metadata"].get("namespace"), field_manager=FIELD_MANAGER,
                          force_conflicts=True if force else None, dry_run="All" if dry_run else None)

    def delete(self, kind: str, name: str, namespace: str) -> None:
        self._call(self.resource(kind).delete, name=name, namespace=namespace, propagation_policy="Background")

    def log(self, pod: str, namespace: str, container: str, tail: int) -> str:
        resp = self.dyn.request("get", f"/api/v1/namespaces/{namespace}/pods/{pod}/log", serialize=False,
                                query_params=[("container", container), ("tailLines", tail)],
                                _request_timeout=REQUEST_TIMEOUT)
        return resp.data.decode(errors="replace")


def connect(kubeconfig: str | None, context: str | None) -> Kube:
    from kubernetes import client, config
    from urllib3.exceptions import HTTPError

    try:
        api = config.new_client_from_config(config_file=kubeconfig, context=context)
        context = context or config.list_kube_config_contexts(config_file=kubeconfig)[1]["name"]
        where = f"{api.configuration.host} (context {context})"
    except config.ConfigException as exc:
        if kubeconfig or context or not os.environ.get("KUBERNETES_SERVICE_HOST"):
            raise KubeError(f"no usable kubeconfig: {exc}; pass --kubeconfig / --context or set KUBECONFIG") from None
        configuration = client.Configuration()
        config.load_incluster_config(client_configuration=configuration)
        api, where = client.ApiClient(configuration), "the in-cluster API server (service account)"
    try:
        return Kube(api, where)
    except (HTTPError, ValueError) as exc:
        raise KubeError(f"cannot reach the Kubernetes API server at {where}: {exc}; check --context / "
                        f"--kubeconfig and that the cluster is up") from None


# ---- preflight: pure GPU arithmetic -------------------------------------------------------------

@dataclass(frozen=True)
class NodeInfo:
    name: str
    labels: dict[str, str]
    gpus: int  # allocatable nvidia.com/gpu
    used: int = 0  # nvidia.com/gpu held by pods of other workloads on this node
    taints: tuple[dict, ...] = ()
    schedulable: bool = True  # Ready and not cordoned

    @property
    def free(self) -> int:
        return max(self.gpus - self.used, 0)


@dataclass(frozen=True)
class PoolFit:
    pool: str
    selector: dict[str, str]
    pods: int
    gpus_per_pod: int
    nodes: tuple[str, ...]  # nodes a pod of this pool may land on (selector, taints, schedulable)
    free: int  # free GPUs on those nodes, before any pod of this fleet is placed
    placed: int  # pods that fit: each needs gpus_per_pod free GPUs on one node
    shared: bool  # some of those nodes can also take the other pool's pods

    @property
    def need(self) -> int:
        return self.pods * self.gpus_per_pod

    @property
    def ok(self) -> bool:
        return self.placed >= self.pods


def tolerates(tolerations: list[dict], taint: dict) -> bool:
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


def pool_tolerations(pool) -> list[dict]:
    return [GPU_TOLERATION, *(t.model_dump(exclude_none=True, by_alias=True) for t in pool.tolerations)]


def plan_gpus(pools: dict[str, Any], nodes: list[NodeInfo]) -> list[PoolFit]:
    """Place every pool's pods on `nodes` (best fit, the pool with the fewest candidate nodes first;
    pools share nodes), and report per pool what it needs against what fits."""
    from rollfleet.render import node_selector

    free = {n.name: n.free for n in nodes}
    eligible = {}
    for name, pool in pools.items():
        selector, tolerations = node_selector(pool), pool_tolerations(pool)
        eligible[name] = [n for n in nodes if n.schedulable and selector.items() <= n.labels.items()
                          and all(tolerates(tolerations, t) for t in n.taints)]
    placed = dict.fromkeys(pools, 0)
    for name in sorted(pools, key=lambda p: len(eligible[p])):
        need = pools[name].gpus_per_node
        for _ in range(pools[name].nodes):
            fitting = [n.name for n in eligible[name] if free[n.name] >= need]
            if not fitting:
                break
            best = min(fitting, key=lambda n: (free[n], n))  # best fit keeps the emptiest nodes whole
            free[best] -= need
            placed[name] += 1
    fits = []
    for name, pool in pools.items():
        mine = {n.name for n in eligible[name]}
        others = set().union(*({n.name for n in eligible[o]} for o in pools if o != name))
        fits.append(PoolFit(name, node_selector(pool), pool.nodes, pool.gpus_per_node, tuple(sorted(mine)),
                            sum(n.free for n in eligible[name]), placed[name], bool(mine & others)))
    return fits


def gpu_table(fits: list[PoolFit]) -> str:
    rows = [("pool", "node selector", "need", "matching nodes", "free GPUs there", "pods that fit", "")]
    for f in fits:
        rows.append((f.pool, ",".join(f"{k}={v}" for k, v in f.selector.items()) or "(any node)",
                     f"{f.pods} pod{'s' * (f.pods != 1)} × {f.gpus_per_pod} = {f.need} GPU",
                     str(len(f.nodes)), str(f.free), f"{f.placed}/{f.pods}", "ok" if f.ok else "NOT ENOUGH"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def gpu_problem(f: PoolFit) -> str:
    where = f"{len(f.nodes)} matching node{'s' * (len(f.nodes) != 1)}"
    shared = " (shared with the other pool, whose pods were placed too)" if f.shared else ""
    fix = (f"free GPUs there, add nodes, or lower pools.{f.pool}.nodes / pools.{f.pool}.gpusPerNode"
           if f.nodes else f"no schedulable node matches: check pools.{f.pool}.gpuProduct, "
                           f"pools.{f.pool}.nodeSelector and pools.{f.pool}.tolerations")
    return (f"pools.{f.pool}: needs {f.pods} pod(s) with {f.gpus_per_pod} free {GPU} each on one node, "
            f"but only {f.placed} fit on {where}{shared} ({f.free} GPUs free there); {fix}")


def node_info(node: dict, used: int) -> NodeInfo:
    status = node.get("status") or {}
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in status.get("conditions") or [])
    return NodeInfo(node["metadata"]["name"], node["metadata"].get("labels") or {},
                    int((status.get("allocatable") or {}).get(GPU, 0)), used,
                    tuple((node.get("spec") or {}).get("taints") or ()),
                    ready and not (node.get("spec") or {}).get("unschedulable"))


def pod_gpus(pod: dict) -> int:
    total = 0
    for c in (pod.get("spec") or {}).get("containers") or []:
        resources = c.get("resources") or {}
        total += max(int((resources.get(k) or {}).get(GPU, 0)) for k in ("requests", "limits"))
    return total


# ---- preflight: the checks ----------------------------------------------------------------------

def instance_labels(spec) -> dict[str, str]:
    """Labels every pod of this fleet carries, whether `rollfleet deploy` or the Helm chart created it."""
    return {"app.kubernetes.io/name": "rollfleet", "app.kubernetes.io/instance": spec.name}


def instance_selector(spec) -> str:
    return ",".join(f"{k}={v}" for k, v in instance_labels(spec).items())


def down_selector(spec) -> str:
    from rollfleet.render import MANAGED_BY

    return f"app.kubernetes.io/instance={spec.name},app.kubernetes.io/managed-by={MANAGED_BY}"


def preflight(kube: Kube, spec, check_gpus: bool = True) -> tuple[list[str], list[str], list[PoolFit]]:
    """(problems, warnings, GPU fits). Reads only; a check it is not allowed to run is a warning."""
    from kubernetes.dynamic.exceptions import ForbiddenError

    problems, warnings, fits = [], [], []
    ns = spec.namespace
    groups = {g["name"]: [v["version"] for v in g["versions"]] for g in kube.raw("/apis")["groups"]}
    needed = ["rayjobs", "rayclusters"] if spec.job.enabled else ["rayclusters"]
    if "v1" not in groups.get("ray.io", []):
        have = (f"the ray.io API group serves only {', '.join(groups['ray.io'])} (an older KubeRay)"
                if groups.get("ray.io") else "the ray.io API group is not served: KubeRay's CRDs are not installed")
        problems.append(f"KubeRay CRDs {', '.join(p + '.ray.io' for p in needed)} are not served at ray.io/v1 "
                        f"({have}); install the KubeRay operator v1.7.0 with its CRDs: {KUBERAY_INSTALL}")
    else:
        served = {r["name"] for r in kube.raw("/apis/ray.io/v1")["resources"]}
        problems += [f"KubeRay CRD {p}.ray.io is not served at ray.io/v1; install the KubeRay operator v1.7.0 "
                     f"with its CRDs: {KUBERAY_INSTALL}" for p in needed if p not in served]

    namespace_ok = True
    try:
        if kube.get("Namespace", ns) is None:
            namespace_ok = False
            problems.append(f"namespace {ns!r} does not exist; create it (kubectl create namespace {ns}) "
                            f"or set `namespace:` in the values")
    except ForbiddenError as exc:
        warnings.append(f"namespace {ns!r} not checked: {api_message(exc)}")

    secrets = []
    if spec.model.hf_token_secret:
        ref = spec.model.hf_token_secret
        secrets.append((ref.name, ref.key, "model.hfTokenSecret"))
    secrets += [(name, None, f"image.pullSecrets[{i}]") for i, name in enumerate(spec.image.pull_secrets)]
    for name, key, field in secrets if namespace_ok else []:
        try:
            keys = secret_keys(kube, ns, name)
        except ForbiddenError as exc:
            warnings.append(f"Secret {ns}/{name} ({field}) not checked: {api_message(exc)}")
            continue
        if keys is None:
            fix = (f"kubectl -n {ns} create secret generic {name} --from-file={key}=<a file holding the token>"
                   if key else f"kubectl -n {ns} create secret docker-registry {name} --docker-server=<registry> "
                   f"--docker-username=<user> --docker-password=<password>")
            problems.append(f"Secret {ns}/{name} ({field}.name) does not exist; create it: {fix}")
        elif key and key not in keys:
            problems.append(f"Secret {ns}/{name} has no key {key!r} ({field}.key); its keys: "
                            f"{', '.join(keys) or '(none)'}; set {field}.key to one of them or add the key")

    if check_gpus:
        try:
            fits = gpu_fits(kube, spec)
            problems += [gpu_problem(f) for f in fits if not f.ok]
        except ForbiddenError as exc:
            warnings.append(f"GPU capacity not checked: {api_message(exc)} (pass --skip-gpu-check to silence)")
    return problems, warnings, fits


def secret_keys(kube: Kube, namespace: str, name: str) -> list[str] | None:
    """The key names of a Secret, or None when it does not exist. Kubernetes has no way to list a
    Secret's keys without reading it; the values are dropped here and never printed or kept."""
    secret = kube.get("Secret", name, namespace)
    if secret is None:
        return None
    return sorted(secret.get("data") or {})


def gpu_fits(kube: Kube, spec) -> list[PoolFit]:
    used: dict[str, int] = {}
    mine = instance_labels(spec).items()
    for pod in kube.list("Pod", fields="status.phase!=Succeeded,status.phase!=Failed"):
        labels = pod["metadata"].get("labels") or {}
        if pod["metadata"].get("namespace") == spec.namespace and mine <= labels.items():
            continue  # this fleet's own pods (a re-deploy) do not count against it
        node = (pod.get("spec") or {}).get("nodeName")
        if node:
            used[node] = used.get(node, 0) + pod_gpus(pod)
    nodes = [node_info(n, used.get(n["metadata"]["name"], 0)) for n in kube.list("Node")]
    return plan_gpus({"trainer": spec.pools.trainer, "inference": spec.pools.inference}, nodes)


# ---- deploy -------------------------------------------------------------------------------------

def ref(obj: dict) -> str:
    return f"{obj['kind']} {obj['metadata'].get('namespace', '')}/{obj['metadata']['name']}"


def apply_problem(obj: dict, exc) -> str:
    message = api_message(exc)
    if exc.status == 409:
        return (f"{ref(obj)}: {message}; another field manager (a kubectl edit, the Helm chart, ...) owns these "
                f"fields: change them back, or rerun with --force-conflicts to take them over")
    if exc.status == 422:
        return f"{ref(obj)} rejected by the API server: {message}"
    return f"{ref(obj)}: the API server answered {exc.status}: {message}"


def apply_objects(kube: Kube, objects: list[dict], force: bool) -> tuple[list[str], list[str]]:
    """Dry-run every object, then apply them all. Returns (outcome lines, problems); with problems
    from the dry run nothing was written."""
    from kubernetes.dynamic.exceptions import DynamicApiError

    problems, before = [], {}
    for obj in objects:
        before[ref(obj)] = kube.get(obj["kind"], obj["metadata"]["name"], obj["metadata"]["namespace"])
        try:
            kube.apply(obj, force, dry_run=True)
        except DynamicApiError as exc:
            problems.append(apply_problem(obj, exc))
    if problems:
        return [], problems
    lines = []
    for obj in objects:
        try:
            after = kube.apply(obj, force)
        except DynamicApiError as exc:  # the dry run passed: something changed in between
            return lines, [apply_problem(obj, exc)]
        old = before[ref(obj)]
        outcome = ("created" if old is None else "unchanged"
                   if old["metadata"]["resourceVersion"] == after["metadata"]["resourceVersion"] else "configured")
        lines.append(f"{ref(obj)}: {outcome}")
    return lines, []


def deploy(kube: Kube, spec, args) -> int:
    from rollfleet.render import render_objects

    if args.wait == "complete" and not spec.job.enabled:
        err("--wait complete: job.enabled is false, and a standalone RayCluster never completes; use --wait ready")
        return NOTHING_APPLIED
    objects = render_objects(spec)
    say(f"preflight against {kube.where}, namespace {spec.namespace}")
    problems, warnings, fits = preflight(kube, spec, check_gpus=not args.skip_gpu_check)
    if fits:
        say(gpu_table(fits))
    for w in warnings:
        print(f"warning: {w}", file=sys.stderr)
    if not problems:
        lines, problems = apply_objects(kube, objects, args.force_conflicts)
        for line in lines:
            say(line)
        if problems and lines:  # the real apply failed part-way
            for p in problems:
                err(p)
            return FAILED
    if problems:
        for p in problems:
            err(p)
        err(f"nothing applied ({len(problems)} problem{'s' * (len(problems) != 1)})")
        return NOTHING_APPLIED
    if args.wait == "none":
        return 0
    return wait(kube, spec, args.wait, args.timeout or spec.timeouts.init_seconds)


# ---- observing the fleet ------------------------------------------------------------------------

@dataclass(frozen=True)
class Snapshot:
    line: str  # one-line progress
    done: bool
    failure: str | None
    found: bool  # the RayJob / RayCluster exists


def ready(pod: dict) -> bool:
    return any(c.get("type") == "Ready" and c.get("status") == "True"
               for c in (pod.get("status") or {}).get("conditions") or [])


def pools_line(spec, pods: list[dict]) -> str:
    want = {"head": 1, "trainer": spec.pools.trainer.nodes, "inference": spec.pools.inference.nodes}
    count = dict.fromkeys(want, 0)
    for pod in pods:
        component = (pod["metadata"].get("labels") or {}).get("app.kubernetes.io/component")
        if component in count and ready(pod):
            count[component] += 1
    return "pods ready: " + ", ".join(f"{k} {count[k]}/{want[k]}" for k in want)


def judge(spec, until: str, top: dict | None, pods: list[dict]) -> Snapshot:
    """Where the fleet stands, from the RayJob (job.enabled) or the RayCluster, and its pods."""
    kind = "RayJob" if spec.job.enabled else "RayCluster"
    name = f"{kind} {spec.namespace}/{spec.name}"
    if top is None:
        return Snapshot(f"{name}: not found", False, None, False)
    st = top.get("status") or {}
    if spec.job.enabled:
        deployment, job = st.get("jobDeploymentStatus") or "-", st.get("jobStatus") or "-"
        cluster = st.get("rayClusterStatus") or {}
        line = (f"{name}: deployment {deployment}, job {job}; RayCluster {st.get('rayClusterName') or '-'}: "
                f"{cluster.get('state') or '-'}; {pools_line(spec, pods)}")
        failure = None
        if deployment in ("Failed", "ValidationFailed") or job in ("FAILED", "STOPPED") \
                or (deployment == "Complete" and job != "SUCCEEDED"):
            why = ": ".join(x for x in (st.get("reason"), st.get("message")) if x)
            failure = f"{name} failed: deployment {deployment}, job {job}" + (f" ({why})" if why else "")
        done = deployment == "Complete" if until == "complete" else deployment in ("Running", "Complete")
        return Snapshot(line, done and failure is None, failure, True)
    state = st.get("state") or "-"
    provisioned = any(c.get("type") == "RayClusterProvisioned" and c.get("status") == "True"
                      for c in st.get("conditions") or [])
    line = f"{name}: {state}; {pools_line(spec, pods)}"
    failure = f"{name} failed: {st.get('reason') or st.get('message') or 'state failed'}" if state == "failed" else None
    return Snapshot(line, state == "ready" or provisioned, failure, True)


def observe(kube: Kube, spec, until: str) -> tuple[Snapshot, list[dict]]:
    kind = "RayJob" if spec.job.enabled else "RayCluster"
    top = kube.get(kind, spec.name, spec.namespace)
    pods = kube.list("Pod", spec.namespace, labels=instance_selector(spec))
    return judge(spec, until, top, pods), pods


def waiting_for(spec, until: str) -> tuple[str, str]:
    """(what is waited for, what it is once reached)."""
    if not spec.job.enabled:
        return (f"RayCluster {spec.namespace}/{spec.name} to be ready (state ready: head + {spec.pools.trainer.nodes} "
                f"trainer + {spec.pools.inference.nodes} inference pod(s))", "is ready")
    if until == "complete":
        return (f"RayJob {spec.namespace}/{spec.name} to succeed (jobDeploymentStatus Complete, jobStatus "
                f"SUCCEEDED)", "succeeded")
    return (f"RayJob {spec.namespace}/{spec.name} to be running (jobDeploymentStatus Running: cluster ready, job "
            f"submitted)", "is running")


def wait(kube: Kube, spec, until: str, timeout: float) -> int:
    from kubernetes.dynamic.exceptions import DynamicApiError
    from urllib3.exceptions import HTTPError

    what, reached = waiting_for(spec, until)
    say(f"waiting up to {timeout:g}s for {what}")
    start = time.monotonic()
    last, last_at, seen = None, 0.0, set()
    snap = Snapshot("nothing observed yet", False, None, False)
    while True:
        elapsed = time.monotonic() - start
        try:
            snap, pods = observe(kube, spec, until)
            news = [p for p in pod_problems(spec, pods, []) if p not in seen] if not snap.done else []
        except (DynamicApiError, HTTPError) as exc:  # a blip: say so, keep waiting until the timeout
            snap, news = Snapshot(f"API request failed ({getattr(exc, 'status', '')} {exc}); retrying",
                                  False, None, snap.found), []
        if snap.line != last or elapsed - last_at >= HEARTBEAT_SECONDS:
            say(f"[{elapsed:5.0f}s] {snap.line}")
            last, last_at = snap.line, elapsed
        for p in news:
            say(f"[{elapsed:5.0f}s] problem: {p}")
            seen.add(p)
        if snap.failure:
            err(snap.failure)
            for reason in diagnose(kube, spec):
                err(reason)
            return FAILED
        if snap.done:
            say(f"{what.split(' to ')[0]} {reached} ({elapsed:.0f}s)")
            return 0
        if elapsed >= timeout:
            err(f"timed out after {timeout:g}s waiting for {what}")
            err(f"last seen: {snap.line}")
            reasons = diagnose(kube, spec)
            for reason in reasons:
                err(reason)
            if not reasons:
                err("no pod or event reports a problem: images may still be pulling or engines loading; "
                    "raise --timeout (or timeouts.initSeconds)")
            return FAILED
        time.sleep(min(POLL_SECONDS, max(timeout - elapsed, 0.0)))


# ---- reasons, from pods and events --------------------------------------------------------------

def field_of(pod: dict) -> str:
    labels = pod["metadata"].get("labels") or {}
    component = labels.get("app.kubernetes.io/component")
    if component in ("trainer", "inference"):
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


def pod_problems(spec, pods: list[dict], events: list[dict]) -> list[str]:
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
    tops = {("RayJob" if spec.job.enabled else "RayCluster", spec.name)}
    for ev in events:
        obj = ev.get("involvedObject") or {}
        reason, message = ev.get("reason", ""), " ".join((ev.get("message") or "").split())
        if obj.get("kind") == "Pod" and obj.get("name") in names and reason in POD_EVENT_REASONS:
            where = names[obj["name"]]
            line = f"pod {obj['name']} ({where}): {reason}: {message}{hint(message, where)}"
            if not any(message and message in o for o in out):
                out.append(line)
        elif (obj.get("kind"), obj.get("name")) in tops or (obj.get("kind") == "RayCluster"
                                                            and obj.get("name", "").startswith(spec.name)):
            out.append(f"{obj['kind']} {spec.namespace}/{obj['name']}: {reason}: {message}")
    return list(dict.fromkeys(out))


def diagnose(kube: Kube, spec) -> list[str]:
    pods = kube.list("Pod", spec.namespace, labels=instance_selector(spec))
    if spec.job.enabled:
        pods += kube.list("Pod", spec.namespace, labels=f"job-name={spec.name}")  # the submitter Job's pods
    events = kube.list("Event", spec.namespace, fields="type=Warning")
    return pod_problems(spec, pods, events)


# ---- status, logs, down -------------------------------------------------------------------------

def status(kube: Kube, spec, args) -> int:
    if args.wait == "complete" and not spec.job.enabled:
        err("--wait complete: job.enabled is false, and a standalone RayCluster never completes; use --wait ready")
        return NOTHING_APPLIED
    if args.wait:
        return wait(kube, spec, args.wait, args.timeout or spec.timeouts.init_seconds)
    from rollfleet.render import config_name

    kind = "RayJob" if spec.job.enabled else "RayCluster"
    for k, name in (("ConfigMap", config_name(spec)), (kind, spec.name)):
        obj = kube.get(k, name, spec.namespace)
        state = f"present (resourceVersion {obj['metadata']['resourceVersion']})" if obj else "absent"
        say(f"{k} {spec.namespace}/{name}: {state}")
    snap, _ = observe(kube, spec, "ready")
    say(snap.line)
    for p in diagnose(kube, spec):
        say(f"problem: {p}")
    if snap.failure:
        err(snap.failure)
    return 0 if snap.found and not snap.failure else FAILED


def logs(kube: Kube, spec, args) -> int:
    component = args.component or ("submitter" if spec.job.enabled and spec.job.submission_mode == "K8sJobMode"
                                   else "head")
    labels = (f"job-name={spec.name}" if component == "submitter"
              else f"{instance_selector(spec)},app.kubernetes.io/component={component}")
    pods = sorted(kube.list("Pod", spec.namespace, labels=labels), key=lambda p: p["metadata"].get("creationTimestamp", ""))
    if not pods:
        err(f"no {component} pod in namespace {spec.namespace} (labels {labels}); `rollfleet status` shows what exists "
            f"(a finished RayJob's pods go after job.ttlSecondsAfterFinished)")
        return FAILED
    for pod in pods:
        container = pod["spec"]["containers"][0]["name"]
        say(f"==> pod {pod['metadata']['name']}, container {container} (last {args.tail} lines) <==")
        sys.stdout.write(kube.log(pod["metadata"]["name"], spec.namespace, container, args.tail))
    return 0


def down(kube: Kube, spec, args) -> int:
    from kubernetes.dynamic.exceptions import NotFoundError

    selector, ns = down_selector(spec), spec.namespace
    found = []
    for kind in CREATED_KINDS:
        try:
            found += [(kind, item) for item in kube.list(kind, ns, labels=selector)]
        except NotServed:  # ray.io/v1 not served: none of these can exist
            continue
    if not found:
        say(f"nothing to delete: no {', '.join(CREATED_KINDS)} labelled {selector} in namespace {ns}")
        return 0
    uids = {item["metadata"]["uid"] for _, item in found}
    for kind, item in found:
        name = item["metadata"]["name"]
        owner = next((o for o in item["metadata"].get("ownerReferences") or [] if o.get("controller")), None)
        if owner and owner.get("uid") in uids:
            say(f"{kind} {ns}/{name}: goes with its owner {owner['kind']} {owner['name']}")
            continue
        try:
            kube.delete(kind, name, ns)
            say(f"deleted {kind} {ns}/{name}")
        except NotFoundError:
            say(f"{kind} {ns}/{name}: already gone")
    left = [(kind, item["metadata"]["name"]) for kind, item in found]
    what = ", ".join(f"{k} {ns}/{n}" for k, n in left)
    say(f"waiting up to {args.timeout:g}s for {what} to be gone")
    deadline = time.monotonic() + args.timeout
    while True:
        left = [(k, n) for k, n in left if kube.get(k, n, ns) is not None]
        if not left:
            say("gone")
            return 0
        if time.monotonic() >= deadline:
            err(f"timed out after {args.timeout:g}s waiting for {', '.join(f'{k} {ns}/{n}' for k, n in left)} "
                f"to be gone (a finalizer may hold it: is the KubeRay operator running?)")
            return FAILED
        time.sleep(min(POLL_SECONDS, max(deadline - time.monotonic(), 0.0)))
