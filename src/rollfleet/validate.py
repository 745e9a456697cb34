"""Offline validation of rendered objects: KubeRay CRD schemas made strict, built-ins via kubernetes-validate.

The KubeRay v1.7.0 CRDs are not copied into this repo: CI reads ../shared/kuberay-v1.7.0/crds,
elsewhere `make crds` downloads them into .cache/ (ROLLFLEET_CRDS_DIR or --crds points at either). The
Prometheus Operator's PodMonitor and PrometheusRule CRDs (for what `monitoring` renders) come from its
module on the Go module proxy: `make monitoring-crds` (ROLLFLEET_MONITORING_CRDS_DIR points at them).
Parsing the 2.3 MB of CRD YAML is what made `validate` slow: the C loader reads a CRD once, and its
strict v1 schema is kept as JSON under ~/.cache/rollfleet/ (keyed by the file's sha256) for later runs.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from rollfleet.spec import KUBERAY_VERSION, PROMETHEUS_OPERATOR_VERSION  # re-exported: the CRDs checked against

KUBERNETES_VERSION = "1.33.0"  # the built-in schema version objects are checked against
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}
CRD_URL = "https://raw.githubusercontent.com/ray-project/kuberay/{version}/ray-operator/config/crd/bases/{file}"
MONITORING_CRD_FILES = {"PodMonitor": "monitoring.coreos.com_podmonitors.yaml",
                        "PrometheusRule": "monitoring.coreos.com_prometheusrules.yaml"}
API_VERSIONS = {**dict.fromkeys(CRD_FILES, "ray.io/v1"), **dict.fromkeys(MONITORING_CRD_FILES, "monitoring.coreos.com/v1")}


class CrdsMissing(FileNotFoundError):
    pass


def crds_dir(explicit: Path | None = None) -> Path:
    """Where the KubeRay CRDs are: `explicit` (--crds), else $ROLLFLEET_CRDS_DIR, else ../shared or .cache
    beside the checkout."""
    if explicit is not None:
        missing = [f for f in CRD_FILES.values() if not (explicit / f).is_file()]
        if missing:
            raise CrdsMissing(f"--crds {explicit}: {', '.join(missing)} not there; download the KubeRay "
                              f"{KUBERAY_VERSION} CRDs into it: {download_hint()}")
        return explicit
    root = Path(__file__).resolve().parents[2]
    candidates = [os.environ.get("ROLLFLEET_CRDS_DIR"), root.parent / "shared/kuberay-v1.7.0/crds",
                  root / f".cache/kuberay-{KUBERAY_VERSION}/crds"]
    for c in candidates:
        if c and all((Path(c) / f).is_file() for f in CRD_FILES.values()):
            return Path(c)
    raise CrdsMissing(f"KubeRay {KUBERAY_VERSION} CRDs not found (looked in {[str(c) for c in candidates if c]}); "
                      f"in a checkout run `make crds`; elsewhere download them into a directory and pass "
                      f"--crds DIR (or set ROLLFLEET_CRDS_DIR): {download_hint()}")


def monitoring_crds_dir() -> Path:
    """Where the Prometheus Operator's CRDs are: $ROLLFLEET_MONITORING_CRDS_DIR, else .cache beside the checkout."""
    root = Path(__file__).resolve().parents[2]
    candidates = [os.environ.get("ROLLFLEET_MONITORING_CRDS_DIR"),
                  root / f".cache/prometheus-operator-{PROMETHEUS_OPERATOR_VERSION}/crds"]
    for c in candidates:
        if c and all((Path(c) / f).is_file() for f in MONITORING_CRD_FILES.values()):
            return Path(c)
    module = (f"https://proxy.golang.org/github.com/prometheus-operator/prometheus-operator/@v/"
              f"{PROMETHEUS_OPERATOR_VERSION}.zip")
    raise CrdsMissing(f"the Prometheus Operator {PROMETHEUS_OPERATOR_VERSION} CRDs (for monitoring.podMonitor / "
                      f"monitoring.alerts) not found (looked in {[str(c) for c in candidates if c]}); in a checkout "
                      f"run `make monitoring-crds`; elsewhere take example/prometheus-operator-crd/"
                      f"{' and '.join(MONITORING_CRD_FILES.values())} from {module} into a directory and set "
                      f"ROLLFLEET_MONITORING_CRDS_DIR to it")


def download_hint() -> str:
    urls = " ".join(CRD_URL.format(version=KUBERAY_VERSION, file=f) for f in CRD_FILES.values())
    return f"mkdir -p DIR && cd DIR && curl -fsSLO {urls.replace(' ', ' -O ')}"


def make_strict(schema: Any) -> Any:
    """Reject unknown fields the way the API server prunes/rejects them: every object with
    `properties` and no `additionalProperties` / `x-kubernetes-preserve-unknown-fields` gets
    `additionalProperties: false`."""
    if isinstance(schema, dict):
        out = {k: make_strict(v) for k, v in schema.items()}
        if ("properties" in out and "additionalProperties" not in out
                and not out.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [make_strict(v) for v in schema]
    return schema


def strict_schema(crd_text: bytes) -> dict[str, Any]:
    """The CRD's v1 openAPIV3Schema, made strict (the C YAML loader: pure-Python parsing takes seconds)."""
    crd = yaml.load(crd_text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    version = next(v for v in crd["spec"]["versions"] if v["name"] == "v1")
    schema = make_strict(copy.deepcopy(version["schema"]["openAPIV3Schema"]))
    # the API server fills metadata itself; its CRD schema is just `type: object`
    schema["properties"]["metadata"] = {"type": "object"}
    return schema


def _cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "rollfleet" / "crd-schemas"


def cached_strict_schema(path: Path) -> dict[str, Any]:
    """strict_schema(path), read from the JSON cache when this exact file was seen before."""
    text = path.read_bytes()
    cached = _cache_dir() / f"{path.stem}-{hashlib.sha256(text).hexdigest()[:16]}.json"
    try:
        return json.loads(cached.read_text())
    except (OSError, ValueError):
        pass
    schema = strict_schema(text)
    try:  # a cache that cannot be written only costs time
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(schema))
        tmp.replace(cached)
    except OSError:
        pass
    return schema


@functools.lru_cache(maxsize=None)
def crd_validator(kind: str, directory: str) -> jsonschema.Draft7Validator:
    return jsonschema.Draft7Validator(cached_strict_schema(Path(directory) / (CRD_FILES | MONITORING_CRD_FILES)[kind]))


def _where(error: jsonschema.ValidationError) -> str:
    return ".".join(str(p) for p in error.absolute_path) or "(root)"


def validate_object(obj: dict[str, Any], crds: Path | None = None) -> list[str]:
    """Problems with one object, each as `Kind/name: path: message`. Empty when valid."""
    kind = obj.get("kind", "?")
    name = f"{kind}/{obj.get('metadata', {}).get('name', '?')}"
    if kind in API_VERSIONS:
        if obj.get("apiVersion") != API_VERSIONS[kind]:
            return [f"{name}: apiVersion {obj.get('apiVersion')!r} is not {API_VERSIONS[kind]}"]
        directory = crds_dir(crds) if kind in CRD_FILES else monitoring_crds_dir()
        validator = crd_validator(kind, str(directory))
        errors = sorted(validator.iter_errors(obj), key=lambda e: list(e.absolute_path))
        return [f"{name}: {_where(e)}: {e.message}" for e in errors]
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{name}: {'.'.join(str(p) for p in exc.path) or '(root)'}: {exc.message}"]
    return []


def validate_objects(objects: list[dict[str, Any]], crds: Path | None = None) -> list[str]:
    return [problem for obj in objects for problem in validate_object(obj, crds)]
