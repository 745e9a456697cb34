"""FleetSpec → Kubernetes objects, through the Jinja templates in manifests/templates (StrictUndefined)."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import jinja2
import yaml

from rollfleet.spec import FleetSpec, load_spec, runtime_config

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


def _json_default(value: Any) -> Any:
    """`tojson` would turn an undefined name into a TypeError; StrictUndefined's own error names it."""
    if isinstance(value, jinja2.Undefined):
        str(value)  # raises jinja2.UndefinedError: '<name>' is undefined
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _env() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(TEMPLATES), undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True, autoescape=False,
    )
    env.policies["json.dumps_kwargs"] = {"sort_keys": False, "default": _json_default}
    env.globals.update(labels=labels, node_selector=node_selector, raylet_health=RAYLET_HEALTH,
                       gcs_health=GCS_HEALTH)
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
    """ConfigMap + (RayJob with an embedded cluster | standalone RayCluster), as plain dicts."""
    env = _env()
    context = {
        "s": spec,
        "config_name": config_name(spec),
        "fleet_json": go_json(runtime_config(spec), indent=2),
        "entrypoint": LAUNCH,
        # JSON is YAML: the RayJob's runtimeEnvYAML (empty: none)
        "runtime_env": go_json(spec.job.runtime_env.ray()) if spec.job.runtime_env.ray() else "",
    }
    names = ["configmap.yaml.j2", "rayjob.yaml.j2" if spec.job.enabled else "raycluster.yaml.j2"]
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


def apply_sets(values: dict[str, Any], sets: list[str]) -> dict[str, Any]:
    """Apply `--set a.b=c` overrides (value parsed as YAML, like Helm's --set for scalars)."""
    out = copy.deepcopy(values)
    for item in sets:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set {item!r}: write --set path.to.key=value")
        node = out
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {item!r}: {part} is not a mapping")
        node[parts[-1]] = yaml.safe_load(raw) if raw else ""
    return out


def merge_default_maps(values: dict[str, Any]) -> dict[str, Any]:
    """Merge the values' `env` and `ncclEnv` into their defaults, as Helm merges a values file into the
    chart's values.yaml (pydantic would replace them, dropping e.g. NCCL_CUMEM_ENABLE=0 when a file only
    adds NCCL_IB_HCA). So `rollfleet render -f` and `helm install -f` build the same spec from the same file.
    As in Helm, `KEY: null` removes a default key; a null for any other key stays and is refused."""
    out = dict(values)
    defaults = FleetSpec().model_dump(by_alias=True)
    for name, field in FleetSpec.model_fields.items():  # the maps with non-empty defaults: env, ncclEnv
        key = field.alias or name
        if isinstance(field.default, dict) and field.default and isinstance(out.get(key), dict):
            merged = {**defaults[key], **out[key]}
            out[key] = {k: v for k, v in merged.items() if v is not None or k not in defaults[key]}
    return out


def load_values(path: str | Path | None, sets: list[str] = ()) -> FleetSpec:
    """Read a values file (YAML), apply --set overrides, validate. Raises SpecError / ValueError."""
    values: dict[str, Any] = {}
    if path:
        loaded = yaml.safe_load(Path(path).read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{path}: the values file must be a YAML mapping")
        values = loaded or {}
    return load_spec(merge_default_maps(apply_sets(values, list(sets))))
