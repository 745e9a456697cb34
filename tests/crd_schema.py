"""What kube-apiserver does with a custom resource's structural schema, for the FAKE API server and tests.

Read from the KubeRay CRD files themselves (the `openAPIV3Schema` of version v1), so a new KubeRay
version brings its own defaults:

- `prune`: drop every field the schema does not declare (no `x-kubernetes-preserve-unknown-fields` in
  these CRDs), keeping `apiVersion`, `kind` and `metadata` at the root as the server does, and nulls of
  non-nullable fields (apiextensions-apiserver `pruning` + `PruneNonNullableNullsWithoutDefaults`);
- `default`: set each `default:` of a declared property that is absent, then descend, into list items
  and map values too (apiextensions-apiserver `schema/defaulting/algorithm.go`);
- `defaults_in_lists`: the defaulted fields that sit inside a list, the ones a server-side apply
  cannot leave to the server (see tests/deploy/test_idempotence.py).
"""

from __future__ import annotations

import copy
import functools
from pathlib import Path
from typing import Any

import yaml

from rollfleet import validate

CRD_FILES = {**validate.CRD_FILES, **validate.MONITORING_CRD_FILES}  # kind -> file, rollfleet's own table
ROOT_FIELDS = ("apiVersion", "kind", "metadata")


@functools.lru_cache(maxsize=None)
def schema_of(kind: str, crds: str) -> dict:
    """The v1 openAPIV3Schema of `kind` (KubeRay's or the Prometheus Operator's) in directory `crds` (parsed
    once per process)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load((Path(crds) / CRD_FILES[kind]).read_text(), Loader=loader)
    return next(v for v in crd["spec"]["versions"] if v["name"] == "v1")["schema"]["openAPIV3Schema"]


def _prune(value: Any, schema: dict, path: str, dropped: list[str]) -> Any:
    if isinstance(value, dict) and schema.get("type") == "object":
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        if schema.get("x-kubernetes-preserve-unknown-fields"):
            return value
        out = {}
        for key, item in value.items():
            sub = (properties or {}).get(key)
            if sub is None and isinstance(extra, dict):
                sub = extra
            if sub is None:
                dropped.append(f"{path}.{key}".lstrip("."))
                continue
            if item is None and not sub.get("nullable") and "default" not in sub:
                continue  # a null for a non-nullable field without a default is dropped
            out[key] = _prune(item, sub, f"{path}.{key}", dropped)
        return out
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [_prune(item, schema["items"], f"{path}[{i}]", dropped) for i, item in enumerate(value)]
    return value


def prune(obj: dict, schema: dict) -> tuple[dict, list[str]]:
    """(obj without undeclared fields, the dotted paths dropped). The root's apiVersion/kind/metadata stay."""
    dropped: list[str] = []
    body = {k: v for k, v in obj.items() if k not in ROOT_FIELDS}
    pruned = _prune(body, schema, "", dropped)
    return {**{k: copy.deepcopy(obj[k]) for k in ROOT_FIELDS if k in obj}, **pruned}, dropped


def default(value: Any, schema: dict) -> Any:
    """`value` with the schema's defaults applied, in place and returned (the server's algorithm)."""
    if isinstance(value, dict):
        for key, sub in (schema.get("properties") or {}).items():
            if "default" in sub and (key not in value or (value[key] is None and not sub.get("nullable"))):
                value[key] = copy.deepcopy(sub["default"])
        extra = schema.get("additionalProperties")
        for key, item in value.items():
            sub = (schema.get("properties") or {}).get(key)
            if sub is None and isinstance(extra, dict):
                sub = extra
            if sub is not None:
                default(item, sub)
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for item in value:
            default(item, schema["items"])
    return value


def defaults_in_lists(schema: dict, path: tuple = (), in_list: bool = False) -> list[tuple[tuple, Any]]:
    """(path, default) of every defaulted property below some list item; `[]` marks a list step.

    A field the server defaults inside a list must be rendered: the stand-in applies every list whole,
    and the real server does so for the lists without `x-kubernetes-list-type: map` (like
    `workerGroupSpecs`), so an apply that leaves such a field to the server is never a no-op."""
    out = []
    for key, sub in (schema.get("properties") or {}).items():
        here = (*path, key)
        if in_list and "default" in sub:
            out.append((here, sub["default"]))
        out += defaults_in_lists(sub, here, in_list)
    if isinstance(schema.get("items"), dict):
        out += defaults_in_lists(schema["items"], (*path, "[]"), True)
    if isinstance(schema.get("additionalProperties"), dict):
        out += defaults_in_lists(schema["additionalProperties"], (*path, "*"), in_list)
    return out


def missing_list_defaults(obj: dict, schema: dict) -> list[str]:
    """The fields `default` would add inside lists of `obj`: what a render must set itself."""
    missing: list[str] = []

    def walk(value: Any, sub: dict, path: str, in_list: bool) -> None:
        if isinstance(value, dict):
            for key, prop in (sub.get("properties") or {}).items():
                if in_list and "default" in prop and key not in value:
                    missing.append(f"{path}.{key}: {prop['default']!r}".lstrip("."))
                if key in value:
                    walk(value[key], prop, f"{path}.{key}", in_list)
            extra = sub.get("additionalProperties")
            if isinstance(extra, dict):
                for key, item in value.items():
                    if key not in (sub.get("properties") or {}):
                        walk(item, extra, f"{path}.{key}", in_list)
        elif isinstance(value, list) and isinstance(sub.get("items"), dict):
            for i, item in enumerate(value):
                walk(item, sub["items"], f"{path}[{i}]", True)

    walk({k: v for k, v in obj.items() if k not in ROOT_FIELDS}, schema, "", False)
    return missing
