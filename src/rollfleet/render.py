"""FleetSpec → Kubernetes objects, through the Jinja templates in manifests/templates (StrictUndefined).

Every spec value reaches the objects through `tojson`, so it is data in the YAML, never syntax.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jinja2
import yaml

from rollfleet.monitoring import dashboard_json
from rollfleet.spec import PORTS, FleetSpec, runtime_config

TEMPLATES = Path(__file__).parent / "templates"
CONFIG_PATH = "/etc/rollfleet/fleet.json"
LAUNCH = f"python -m rollfleet.runtime.launch --config {CONFIG_PATH}"
# KubeRay's own probe commands (dashboard agent on 52365, GCS via the dashboard on 8265).
RAYLET_HEALTH = "wget -T 4 -q -O- http://localhost:52365/api/local_raylet_healthz | grep success"
GCS_HEALTH = "wget -T 4 -q -O- http://localhost:8265/api/gcs_healthz | grep success"
MANAGED_BY = "rollfleet"


def labels(spec: FleetSpec, component: str, extra: dict[str, str]) -> dict[str, str]:
    """The standard label set; `rollfleet down` deletes by instance + managed-by."""
    return {
        **extra,
        "app.kubernetes.io/name": "rollfleet",
        "app.kubernetes.io/instance": spec.name,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }


def node_selector(pool) -> dict[str, str]:
    gpu = {"nvidia.com/gpu.product": pool.gpu_product} if pool.gpu_product else {}
    return {**gpu, **pool.node_selector}


def selector(name: str) -> dict[str, str]:
    """The labels every pod of fleet `name` carries, whether `rollfleet deploy` or the Helm chart made it."""
    return {"app.kubernetes.io/name": "rollfleet", "app.kubernetes.io/instance": name}


def fleet_selector(spec: FleetSpec) -> dict[str, str]:
    """The labels that select every pod of this fleet (the NetworkPolicy's own pods)."""
    return selector(spec.name)


def gang_labels(spec: FleetSpec) -> dict[str, str]:
    """Labels on the RayJob/RayCluster that hand the fleet to a gang scheduler. KubeRay's Volcano and
    YuniKorn integrations size the group from minReplicas (= replicas here): the whole fleet at once."""
    gang, queue = spec.gang_scheduling, spec.gang_scheduling.queue
    if gang.scheduler == "kueue":
        return {"kueue.x-k8s.io/queue-name": queue}
    out = {"ray.io/scheduler-name": gang.scheduler} if gang.scheduler else {}
    if gang.scheduler == "volcano":
        out.update({"volcano.sh/queue-name": queue} if queue else {})
        out.update({"ray.io/priority-class-name": spec.priority_class_name} if spec.priority_class_name else {})
    if gang.scheduler == "yunikorn":
        out.update({"ray.io/gang-scheduling-enabled": "true", "yunikorn.apache.org/app-id": spec.name})
        out.update({"yunikorn.apache.org/queue": queue} if queue else {})
    return out


def pod_security(spec: FleetSpec) -> dict[str, Any]:
    """The pod securityContext: Pod Security "restricted" (non-root, seccomp) unless the values loosen it."""
    sec = spec.pod_security
    out: dict[str, Any] = {"runAsNonRoot": True, "runAsUser": sec.run_as_user, "runAsGroup": sec.run_as_group}
    if sec.fs_group is not None:
        out["fsGroup"] = sec.fs_group
    out["seccompProfile"] = {"type": sec.seccomp_profile}
    return out


def container_security(rdma: bool) -> dict[str, Any]:
    """No privilege escalation, every capability dropped; IPC_LOCK (outside "restricted") only with RDMA."""
    caps: dict[str, Any] = {"drop": ["ALL"], **({"add": ["IPC_LOCK"]} if rdma else {})}
    return {"allowPrivilegeEscalation": False, "capabilities": caps}


def gpu_limits(pool) -> list[tuple[str, int]]:
    """Limits beyond cpu and memory: the GPUs, and the RDMA devices when enabled."""
    extra = [("nvidia.com/gpu", pool.gpus_per_node)]
    return extra + ([(pool.rdma.resource_name, pool.rdma.count)] if pool.rdma.enabled else [])


def volume_mount(volume) -> dict[str, Any]:
    out: dict[str, Any] = {"name": volume.name, "mountPath": volume.mount_path}
    out.update({"readOnly": True} if volume.read_only else {})
    out.update({"subPath": volume.sub_path} if volume.sub_path else {})
    return out


def auth_options(spec: FleetSpec) -> dict[str, Any]:
    secret = spec.ray_auth.secret_name
    return {"mode": "token", **({"secretName": secret} if secret else {})}


def namespace_selector(namespace: str | None) -> dict[str, Any]:
    return {"matchLabels": {"kubernetes.io/metadata.name": namespace}} if namespace else {}


def _json_default(value: Any) -> Any:
    """`tojson` would turn an undefined name into a TypeError; StrictUndefined's own error names it."""
    if isinstance(value, jinja2.Undefined):
        str(value)  # raises jinja2.UndefinedError: '<name>' is undefined
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


@functools.lru_cache(maxsize=2)
def _env(templates: Path) -> jinja2.Environment:
    """One environment per template directory: its templates compile once per process."""
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(templates), undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True, autoescape=False,
    )
    env.policies["json.dumps_kwargs"] = {"sort_keys": False, "default": _json_default}
    env.globals.update(labels=labels, node_selector=node_selector, raylet_health=RAYLET_HEALTH,
                       gcs_health=GCS_HEALTH, fleet_selector=fleet_selector, gang_labels=gang_labels,
                       pod_security=pod_security, container_security=container_security, gpu_limits=gpu_limits,
                       volume_mount=volume_mount, auth_options=auth_options, namespace_selector=namespace_selector,
                       ports=PORTS)
    return env


def go_json(value: Any, indent: int | None = None) -> str:
    """JSON with sorted keys, escaped as Go's encoding/json (Helm's `toJson` / `toPrettyJson` with
    indent 2) escapes it, so the chart and the Jinja templates render the same string."""
    text = json.dumps(value, sort_keys=True, indent=indent, separators=(",", ": ") if indent else (",", ":"),
                      ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def config_name(spec: FleetSpec) -> str:
    return f"{spec.name}-config"


def render_objects(spec: FleetSpec) -> list[dict[str, Any]]:
    """ConfigMap + (RayJob with an embedded cluster | standalone RayCluster) + NetworkPolicy (unless
    networkPolicy.enabled is false) + what monitoring enables (PodMonitor, PrometheusRule, the dashboard's
    ConfigMap), as plain dicts."""
    env = _env(TEMPLATES)
    runtime_env = spec.job.runtime_env.ray()
    context = {
        "s": spec,
        "config_name": config_name(spec),
        "fleet_json": go_json(runtime_config(spec), indent=2),
        "entrypoint": LAUNCH,
        # JSON is YAML: the RayJob's runtimeEnvYAML (empty: none)
        "runtime_env": go_json(runtime_env) if runtime_env else "",
        "dashboard_json": dashboard_json() if spec.monitoring.dashboard.enabled else "",
    }
    names = ["configmap.yaml.j2", "rayjob.yaml.j2" if spec.job.enabled else "raycluster.yaml.j2"]
    names += ["networkpolicy.yaml.j2"] if spec.network_policy.enabled else []
    mon = spec.monitoring
    names += ["podmonitor.yaml.j2"] if mon.pod_monitor.enabled else []
    names += ["prometheusrule.yaml.j2"] if mon.alerts.enabled else []
    names += ["dashboard.yaml.j2"] if mon.dashboard.enabled else []
    objects = []
    for name in names:
        text = env.get_template(name).render(context)
        try:
            objects.append(yaml.safe_load(text))
        except yaml.YAMLError as exc:  # a template bug, never user input: show the text
            raise RuntimeError(f"template {name} produced invalid YAML: {exc}\n{text}") from exc
    return objects


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (the runtime config) as literal blocks, so golden renders stay readable."""


_Dumper.add_representer(str, lambda d, v: d.represent_scalar(
    "tag:yaml.org,2002:str", v, style="|" if "\n" in v else None))


def to_yaml(objects: list[dict[str, Any]]) -> str:
    return "---\n" + "---\n".join(yaml.dump(o, Dumper=_Dumper, sort_keys=False, width=120) for o in objects)
