"""FAKE Kubernetes API server: an in-process STAND-IN for kube-apiserver, for tests only.

It is not Kubernetes. It is a threaded `http.server` on 127.0.0.1 (ephemeral port) that serves only
the endpoints `rollfleet.deploy` uses, with the semantics those calls rely on:

- discovery for the `kubernetes` dynamic client: /version, /api, /api/v1, /apis, /apis/<group>/<version>;
- GET one object, LIST with `labelSelector` (k=v, k!=v, k, !k) and `fieldSelector` (path=v, path!=v),
  across one namespace or all; 404 `NotFound` Status objects worded like the real server's;
- server-side apply: PATCH with `application/apply-patch+yaml`, `fieldManager` required, `managedFields`
  kept per manager, 409 `Conflict` when another manager owns a field the apply would change (unless
  `force=true`, which takes the field over), fields dropped from an apply are removed when no other
  manager owns them, a no-op apply changes nothing (same resourceVersion), `dryRun=All` persists nothing;
- the KubeRay CRDs' (and the Prometheus Operator's PodMonitor / PrometheusRule) structural schemas, read
  from the CRD files (tests/crd_schema.py): unknown fields
  are pruned (`fieldValidation=Strict`: refused with 400, else dropped with a `Warning` header),
  and `default:`s are applied to what is stored and returned. As in kube-apiserver, whether an apply is
  a no-op is decided on the merged object *before* defaulting (structured-merge-diff's `Apply`, then
  the defaulter), so an apply that replaces a list whole and omits a field the CRD defaults inside it
  is never a no-op: a new resourceVersion every time, as a real API server showed for
  `workerGroupSpecs[].priority`;
- the `status` subresource: an apply to the main resource ignores `.status`; PATCH .../status
  (merge patch) changes only `.status` and records the writer as an `Update` manager;
- 422 `Invalid` from a pluggable admission check (a validating-webhook stand-in);
- DELETE (an object with finalizers only gets a deletionTimestamp; otherwise it goes, with a cascade
  to objects whose ownerReferences name its uid, as the garbage collector would), pods/<name>/log
  (with `follow=true`: streamed, chunked, until the pod is gone or Succeeded/Failed), Deployments
  (apps/v1, for the operator check), NetworkPolicies, and 403 for verbs a test forbids.

Lists are atomic in this stand-in's merge and field ownership (the real server merges lists marked
`x-kubernetes-list-type: map` per element, so the stand-in is stricter there); nothing here schedules
pods or runs an operator: tests set object status themselves (`set_status`, or an `on_write` hook that
plays the operator).
"""

from __future__ import annotations

import copy
import json
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

import yaml

from crd_schema import default, prune, schema_of


@dataclass(frozen=True)
class ResourceType:
    group: str
    version: str
    plural: str
    kind: str
    namespaced: bool
    subresources: tuple[str, ...] = ()

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        """How the real server names the resource in messages: `rayjobs.ray.io`, `configmaps`."""
        return f"{self.plural}.{self.group}" if self.group else self.plural


CORE = [
    ResourceType("", "v1", "namespaces", "Namespace", False),
    ResourceType("", "v1", "nodes", "Node", False, ("status",)),
    ResourceType("", "v1", "pods", "Pod", True, ("status", "log")),
    ResourceType("", "v1", "configmaps", "ConfigMap", True),
    ResourceType("", "v1", "secrets", "Secret", True),
    ResourceType("", "v1", "events", "Event", True),
    ResourceType("apps", "v1", "deployments", "Deployment", True, ("status",)),
    ResourceType("networking.k8s.io", "v1", "networkpolicies", "NetworkPolicy", True),
]


def kuberay(version: str = "v1") -> list[ResourceType]:
    """The two KubeRay CRDs rollfleet needs, served at `ray.io/<version>`."""
    return [ResourceType("ray.io", version, "rayclusters", "RayCluster", True, ("status",)),
            ResourceType("ray.io", version, "rayjobs", "RayJob", True, ("status",))]


def monitoring() -> list[ResourceType]:
    """The Prometheus Operator's CRDs that `monitoring` renders, served at `monitoring.coreos.com/v1`."""
    return [ResourceType("monitoring.coreos.com", "v1", "podmonitors", "PodMonitor", True),
            ResourceType("monitoring.coreos.com", "v1", "prometheusrules", "PrometheusRule", True)]


class ApiError(Exception):
    def __init__(self, code: int, reason: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details or {}

    def status(self) -> dict:
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "details": self.details, "code": self.code}


# -- helpers on plain objects ---------------------------------------------------------------------

SERVER_FIELDS = ("uid", "resourceVersion", "creationTimestamp", "generation", "managedFields",
                 "deletionTimestamp")


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def _lookup(obj: Any, path: tuple | list) -> Any:
    for part in path:
        if not isinstance(obj, dict) or part not in obj:
            return None
        obj = obj[part]
    return obj


def _leaves(obj: dict, prefix: tuple = ()) -> dict[tuple, Any]:
    """Field paths an apply sets: every non-empty map is descended into, everything else is a leaf
    (lists are atomic here)."""
    out: dict[tuple, Any] = {}
    for key, value in obj.items():
        path = prefix + (key,)
        if isinstance(value, dict) and value:
            out.update(_leaves(value, path))
        else:
            out[path] = value
    return out


def _owned_paths(obj: dict, has_status: bool) -> dict[tuple, Any]:
    skip = {("apiVersion",), ("kind",), ("metadata", "name"), ("metadata", "namespace")}
    return {p: v for p, v in _leaves(obj).items()
            if p not in skip and not (p[0] == "metadata" and len(p) > 1 and p[1] in SERVER_FIELDS)
            and not (has_status and p[0] == "status")}


def _set(obj: dict, path: tuple, value: Any) -> None:
    for part in path[:-1]:
        obj = obj.setdefault(part, {})
    obj[path[-1]] = copy.deepcopy(value)


def _remove(obj: dict, path: tuple) -> None:
    parents = []
    node = obj
    for part in path[:-1]:
        if not isinstance(node, dict) or part not in node:
            return
        parents.append((node, part))
        node = node[part]
    if isinstance(node, dict):
        node.pop(path[-1], None)
    for parent, key in reversed(parents):  # prune maps the removal emptied
        if parent[key] == {}:
            del parent[key]


def _fields_v1(paths) -> dict:
    root: dict = {}
    for path in sorted(paths):
        node = root
        for part in path:
            node = node.setdefault(f"f:{part}", {})
    return root


def _paths_of(fields: dict, prefix: tuple = ()) -> set[tuple]:
    out: set[tuple] = set()
    for key, sub in fields.items():
        path = prefix + (key[2:],)
        out |= _paths_of(sub, path) if sub else {path}
    return out


def _dotted(path: tuple) -> str:
    return "".join(f".{p}" for p in path)


def match_labels(selector: str, labels: dict[str, str]) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        if "(" in term:
            raise ApiError(400, "BadRequest", f"unable to parse requirement: set-based selectors are not "
                                              f"implemented by this fake API server: {term}")
        if "!=" in term:
            key, value = term.split("!=", 1)
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = term.replace("==", "=").split("=", 1)
            if labels.get(key) != value:
                return False
        elif term.startswith("!"):
            if term[1:] in labels:
                return False
        elif term not in labels:
            return False
    return True


def match_fields(selector: str, obj: dict) -> bool:
    for term in filter(None, (t.strip() for t in selector.split(","))):
        negate = "!=" in term
        key, value = term.replace("!=", "=").replace("==", "=").split("=", 1)
        actual = _lookup(obj, key.split("."))
        actual = "" if actual is None else str(actual)
        if (actual == value) == negate:
            return False
    return True


# -- the store and its API semantics --------------------------------------------------------------

class FakeApiServer:
    """A stand-in kube-apiserver (see the module docstring for what it does and does not do)."""

    def __init__(self, types: list[ResourceType] | None = None, crds: Path | None = None):
        """`crds`: the directory of KubeRay's CRD files (default: rollfleet.validate.crds_dir())."""
        self.crds = crds
        self.types = list(CORE + kuberay() + monitoring()) if types is None else list(types)
        self.objects: dict[tuple[str, str, str], dict] = {}  # (plural, namespace, name) -> object
        self.logs: dict[tuple[str, str, str], str] = {}  # (namespace, pod, container) -> text
        self.requests: list[tuple[str, str]] = []  # (method, path?query) of every request served
        self.forbidden: set[tuple[str, str]] = set()  # (verb, plural) answered with 403
        self.admission: Callable[[dict], str | None] = lambda obj: None  # a message means 422 Invalid
        self.on_write: Callable[[FakeApiServer, dict], None] = lambda server, obj: None  # plays an operator
        self.lock = threading.RLock()
        self._rv = 100
        self._uid = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._request = threading.local()  # .warnings: Warning headers of the request being served

    # -- lifecycle
    def start(self) -> FakeApiServer:
        server = self

        class Handler(_Handler):
            api = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, args=(0.05,), name="fake-apiserver",
                         daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}"

    def write_kubeconfig(self, path: Path, context: str = "fake-apiserver") -> Path:
        """A kubeconfig whose one context points at this stand-in (no credentials: it has no auth)."""
        path.write_text(yaml.safe_dump({
            "apiVersion": "v1", "kind": "Config", "current-context": context,
            "clusters": [{"name": "fake-apiserver", "cluster": {"server": self.url}}],
            "users": [{"name": "fake-user", "user": {}}],
            "contexts": [{"name": context, "context": {"cluster": "fake-apiserver", "user": "fake-user"}}],
        }))
        return path

    # -- type lookup
    def type_of(self, kind: str) -> ResourceType:
        for t in self.types:
            if t.kind == kind:
                return t
        raise KeyError(f"this fake API server does not serve kind {kind}")

    def _type_at(self, group: str, version: str, plural: str) -> ResourceType:
        for t in self.types:
            if (t.group, t.version, t.plural) == (group, version, plural):
                return t
        raise ApiError(404, "NotFound", "the server could not find the requested resource")

    def schema(self, t: ResourceType) -> dict | None:
        """The structural schema of a KubeRay or Prometheus Operator kind, None for built-in kinds (not
        modelled here)."""
        if t.group == "monitoring.coreos.com":
            from rollfleet.validate import monitoring_crds_dir

            return schema_of(t.kind, str(monitoring_crds_dir()))
        if t.group != "ray.io":
            return None
        if self.crds is None:
            from rollfleet.validate import crds_dir

            self.crds = crds_dir()
        return schema_of(t.kind, str(self.crds))

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    # -- direct access for tests (the same semantics as over HTTP)
    def add(self, obj: dict) -> dict:
        """Create an object as-is (a test seeding the cluster); returns the stored copy."""
        with self.lock:
            t = self.type_of(obj["kind"])
            obj = copy.deepcopy(obj)
            meta = obj.setdefault("metadata", {})
            ns = meta.get("namespace", "") if t.namespaced else ""
            self._uid += 1
            meta.setdefault("uid", f"fake-uid-{self._uid}")
            meta.setdefault("creationTimestamp", _now())
            meta["resourceVersion"] = self._next_rv()
            self.objects[(t.plural, ns, meta["name"])] = obj
            return copy.deepcopy(obj)

    def get(self, kind: str, name: str, namespace: str = "") -> dict | None:
        t = self.type_of(kind)
        with self.lock:
            obj = self.objects.get((t.plural, namespace if t.namespaced else "", name))
            return copy.deepcopy(obj) if obj else None

    def set_status(self, kind: str, name: str, namespace: str, status: dict, manager: str = "fake-operator") -> dict:
        """What a controller does through the status subresource (merge patch of `.status`)."""
        return self._patch_status(self.type_of(kind), namespace, name, {"status": status}, manager)

    def apply(self, obj: dict, manager: str, force: bool = False, dry_run: bool = False,
              validation: str = "") -> dict:
        """Server-side apply of `obj` by field manager `manager` (what PATCH apply-patch+yaml does)."""
        t = self.type_of(obj.get("kind", ""))
        meta = obj.get("metadata") or {}
        return self._apply(t, meta.get("namespace", ""), meta.get("name", ""), obj, manager, force, dry_run,
                           validation)

    # -- semantics
    def _not_found(self, t: ResourceType, name: str) -> ApiError:
        return ApiError(404, "NotFound", f'{t.qualified} "{name}" not found',
                        {"name": name, "group": t.group, "kind": t.plural})

    def _read(self, t: ResourceType, ns: str, name: str) -> dict:
        obj = self.objects.get((t.plural, ns if t.namespaced else "", name))
        if obj is None:
            raise self._not_found(t, name)
        return obj

    def _list(self, t: ResourceType, ns: str | None, labels: str, fields: str) -> dict:
        items = []
        for (plural, obj_ns, _), obj in sorted(self.objects.items()):
            if plural != t.plural or (ns and obj_ns != ns):
                continue
            if labels and not match_labels(labels, obj["metadata"].get("labels") or {}):
                continue
            if fields and not match_fields(fields, obj):
                continue
            item = copy.deepcopy(obj)
            item.pop("apiVersion", None)  # the real server leaves these to the list
            item.pop("kind", None)
            items.append(item)
        return {"kind": f"{t.kind}List", "apiVersion": t.api_version,
                "metadata": {"resourceVersion": str(self._rv)}, "items": items}

    def _managers(self, obj: dict | None) -> list[dict]:
        return copy.deepcopy((obj or {}).get("metadata", {}).get("managedFields") or [])

    def _apply(self, t: ResourceType, ns: str, name: str, body: dict, manager: str, force: bool,
               dry_run: bool, validation: str = "") -> dict:
        if not manager:
            raise ApiError(400, "BadRequest", "PATCH requests with apply content type require fieldManager")
        if body.get("apiVersion") != t.api_version or body.get("kind") != t.kind:
            raise ApiError(400, "BadRequest", f"the API version in the data ({body.get('apiVersion')}) and kind "
                                              f"({body.get('kind')}) do not match {t.api_version} {t.kind}")
        meta = body.get("metadata") or {}
        if meta.get("name") != name:
            raise ApiError(400, "BadRequest", f"the name of the object ({meta.get('name')}) does not match the "
                                              f"name on the URL ({name})")
        if t.namespaced and meta.get("namespace", ns) != ns:
            raise ApiError(400, "BadRequest", "the namespace of the provided object does not match the "
                                              "namespace sent on the request")
        with self.lock:
            if t.namespaced and ("namespaces", "", ns) not in self.objects:
                raise ApiError(404, "NotFound", f'namespaces "{ns}" not found',
                               {"name": ns, "kind": "namespaces"})
            if ("patch", t.plural) in self.forbidden:
                raise self._forbidden("patch", t, ns, name)
            key = (t.plural, ns if t.namespaced else "", name)
            current = self.objects.get(key)
            schema = self.schema(t)
            if schema is not None:
                body, unknown = prune(body, schema)
                if unknown and validation == "Strict":
                    raise ApiError(400, "BadRequest", f"{t.kind} in version \"{t.version}\" cannot be handled as a "
                                                      f"{t.kind}: strict decoding error: " + ", ".join(
                                                          f'unknown field "{u}"' for u in unknown))
                self._warn(*(f'unknown field "{u}"' for u in unknown))
            has_status = "status" in t.subresources
            applied = _owned_paths(body, has_status)
            managers = self._managers(current)
            owned = {(m["manager"], m["operation"]): _paths_of(m.get("fieldsV1") or {}) for m in managers}

            conflicts = []  # (field path, other manager)
            for (other, operation), paths in owned.items():
                if other == manager and operation == "Apply":
                    continue
                for path in paths:
                    mine = [p for p in applied if p == path or p[:len(path)] == path]
                    if any(_lookup(current, p) != applied[p] for p in mine):
                        conflicts.append((path, other))
            if conflicts and not force:
                fields = sorted({_dotted(p) for p, _ in conflicts})
                who = sorted({m for _, m in conflicts})
                message = (f"Apply failed with {len(fields)} conflict{'s' if len(fields) > 1 else ''}: "
                           + "; ".join(f'conflict with "{m}": ' + ", ".join(
                               sorted(_dotted(p) for p, o in conflicts if o == m)) for m in who))
                causes = [{"type": "FieldManagerConflict", "message": f'conflict with "{m}"', "field": _dotted(p)}
                          for p, m in sorted(conflicts)]
                raise ApiError(409, "Conflict", message, {"name": name, "group": t.group, "kind": t.plural,
                                                          "causes": causes})

            new = copy.deepcopy(current) if current else {"apiVersion": t.api_version, "kind": t.kind,
                                                          "metadata": {"name": name}}
            if t.namespaced:
                new["metadata"]["namespace"] = ns
            others = set().union(*[p for (m, op), p in owned.items() if (m, op) != (manager, "Apply")]) \
                if owned else set()
            for path in owned.get((manager, "Apply"), set()) - set(applied) - others:
                _remove(new, path)
            for path, value in applied.items():
                _set(new, path, value)
            mine = {"manager": manager, "operation": "Apply", "apiVersion": t.api_version, "time": _now(),
                    "fieldsType": "FieldsV1", "fieldsV1": _fields_v1(applied)}
            kept = []
            for m in managers:  # entries keep their order; a new manager's goes last
                if (m["manager"], m["operation"]) == (manager, "Apply"):
                    kept.append(mine)
                    continue
                taken = {p for p, o in conflicts if o == m["manager"]} if force else set()
                left = _paths_of(m.get("fieldsV1") or {}) - taken
                if left:
                    kept.append({**m, "fieldsV1": _fields_v1(left)})
            new["metadata"]["managedFields"] = kept if mine in kept else kept + [mine]

            message = self.admission(new)
            if message:
                raise ApiError(422, "Invalid", f'{t.kind} "{name}" is invalid: {message}',
                               {"name": name, "group": t.group, "kind": t.kind})
            if current is not None and self._same(current, new):
                return copy.deepcopy(current)  # a no-op apply: nothing written, same resourceVersion
            if schema is not None:  # the defaulter runs after the merge and the no-op check
                new.update(default({k: v for k, v in new.items() if k != "metadata"}, schema))
            if current is None:
                self._uid += 1
                new["metadata"].update(uid=f"fake-uid-{self._uid}", creationTimestamp=_now())
                if t.group:
                    new["metadata"]["generation"] = 1
            elif t.group and _spec_changed(current, new):
                new["metadata"]["generation"] = current["metadata"].get("generation", 1) + 1
            if dry_run:
                new["metadata"]["resourceVersion"] = (current or {}).get("metadata", {}).get("resourceVersion", "")
                return new
            new["metadata"]["resourceVersion"] = self._next_rv()
            self.objects[key] = new
            stored = copy.deepcopy(new)
        self.on_write(self, copy.deepcopy(stored))
        return stored

    def _warn(self, *messages: str) -> None:
        """Warning headers for the response to the request being served (`299 - "..."`, as the server)."""
        if messages and hasattr(self._request, "warnings"):
            self._request.warnings.extend(messages)

    @staticmethod
    def _same(a: dict, b: dict) -> bool:
        def strip(o):
            o = copy.deepcopy(o)
            for m in o["metadata"].get("managedFields") or []:
                m.pop("time", None)
            return o
        return strip(a) == strip(b)

    def _patch_status(self, t: ResourceType, ns: str, name: str, patch: dict, manager: str) -> dict:
        if "status" not in t.subresources:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        with self.lock:
            obj = self._read(t, ns, name)
            status = obj.setdefault("status", {})
            _merge(status, patch.get("status") or {})
            paths = {("status",) + p for p in _leaves(patch.get("status") or {})}
            managers = [m for m in obj["metadata"].get("managedFields") or []
                        if (m["manager"], m["operation"]) != (manager, "Update")]
            previous = next((m for m in obj["metadata"].get("managedFields") or []
                             if (m["manager"], m["operation"]) == (manager, "Update")), None)
            paths |= _paths_of(previous["fieldsV1"]) if previous else set()
            managers.append({"manager": manager, "operation": "Update", "apiVersion": t.api_version,
                             "time": _now(), "fieldsType": "FieldsV1", "fieldsV1": _fields_v1(paths),
                             "subresource": "status"})
            obj["metadata"]["managedFields"] = managers
            obj["metadata"]["resourceVersion"] = self._next_rv()
            return copy.deepcopy(obj)

    def _delete(self, t: ResourceType, ns: str, name: str) -> dict:
        with self.lock:
            if ("delete", t.plural) in self.forbidden:
                raise self._forbidden("delete", t, ns, name)
            obj = self._read(t, ns, name)
            if obj["metadata"].get("finalizers"):  # held until its controller removes the finalizers
                obj["metadata"].setdefault("deletionTimestamp", _now())
                obj["metadata"]["resourceVersion"] = self._next_rv()
                return copy.deepcopy(obj)
            del self.objects[(t.plural, ns if t.namespaced else "", name)]
            self._cascade(obj["metadata"]["uid"])
            return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success",
                    "details": {"name": name, "group": t.group, "kind": t.plural, "uid": obj["metadata"]["uid"]}}

    def _cascade(self, uid: str) -> None:
        """What the garbage collector does for background deletion: dependents go too."""
        for key, obj in list(self.objects.items()):
            if key in self.objects and any(r.get("uid") == uid for r in obj["metadata"].get("ownerReferences") or []):
                del self.objects[key]
                self._cascade(obj["metadata"]["uid"])

    def _forbidden(self, verb: str, t: ResourceType, ns: str, name: str) -> ApiError:
        where = f' in the namespace "{ns}"' if t.namespaced and ns else " at the cluster scope"
        return ApiError(403, "Forbidden", f'{t.qualified}{" " + repr(name) if name else ""} is forbidden: User '
                                          f'"fake-user" cannot {verb} resource "{t.plural}" in API group '
                                          f'"{t.group}"{where}')

    def _log(self, ns: str, pod: str, query: dict) -> str:
        with self.lock:
            obj = self._read(self.type_of("Pod"), ns, pod)
            containers = [c["name"] for c in obj.get("spec", {}).get("containers", [])]
            container = query.get("container") or (containers[0] if len(containers) == 1 else None)
            if container not in containers:
                raise ApiError(400, "BadRequest", f"container {container} is not valid for pod {pod}")
            lines = self.logs.get((ns, pod, container), "").splitlines(keepends=True)
            tail = query.get("tailLines")
            return "".join(lines[-int(tail):] if tail else lines)

    def _follow(self, ns: str, pod: str, query: dict):
        """`follow=true`: the tail, then what a test appends to `logs`, until the pod is gone or done."""
        text = self._log(ns, pod, query)
        container = query.get("container") or self._read(self.type_of("Pod"), ns, pod)["spec"]["containers"][0]["name"]
        sent = len(self.logs.get((ns, pod, container), ""))
        yield text.encode()
        while True:
            with self.lock:
                obj = self.objects.get(("pods", ns, pod))
                full = self.logs.get((ns, pod, container), "")
            if len(full) > sent:
                yield full[sent:].encode()
                sent = len(full)
                continue
            if obj is None or (obj.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                return
            time.sleep(0.02)

    # -- routing
    def handle(self, method: str, raw_path: str, headers, body: bytes) -> tuple[int, str, Any]:
        """(status code, content type, payload): bytes, or an iterator of bytes for a streamed log."""
        url = urlsplit(raw_path)
        query = {k: v[-1] for k, v in parse_qs(url.query).items()}
        parts = [p for p in url.path.split("/") if p]
        with self.lock:
            self.requests.append((method, raw_path))
        try:
            if method == "GET" and parts in (["version"], ["api"], ["apis"]) or \
                    method == "GET" and (parts[:1] == ["api"] and len(parts) == 2
                                         or parts[:1] == ["apis"] and len(parts) == 3):
                return _json(200, self._discovery(parts))
            if parts[:1] == ["api"] and len(parts) >= 3:
                group, version, rest = "", parts[1], parts[2:]
            elif parts[:1] == ["apis"] and len(parts) >= 4:
                group, version, rest = parts[1], parts[2], parts[3:]
            else:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            ns = None
            if rest[0] == "namespaces" and len(rest) >= 3:
                ns, rest = rest[1], rest[2:]
            t = self._type_at(group, version, rest[0])
            name = rest[1] if len(rest) > 1 else ""
            sub = rest[2] if len(rest) > 2 else ""
            if t.namespaced and name and ns is None:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            if sub and sub not in t.subresources:
                raise ApiError(404, "NotFound", "the server could not find the requested resource")
            return self._dispatch(method, t, ns or "", name, sub, query, headers, body)
        except ApiError as exc:
            return _json(exc.code, exc.status())

    def _dispatch(self, method, t, ns, name, sub, query, headers, body):
        verb = {"GET": "get" if name else "list", "PATCH": "patch", "DELETE": "delete"}.get(method, method.lower())
        if (verb, t.plural) in self.forbidden:
            raise self._forbidden(verb, t, ns, name)
        if method == "GET" and sub == "log":
            if query.get("follow") == "true":
                self._log(ns, name, query)  # errors (no such pod or container) before streaming starts
                return 200, "text/plain", self._follow(ns, name, query)
            return 200, "text/plain", self._log(ns, name, query).encode()
        if method == "GET":
            with self.lock:
                if not name:
                    return _json(200, self._list(t, ns, query.get("labelSelector", ""),
                                                 query.get("fieldSelector", "")))
                return _json(200, copy.deepcopy(self._read(t, ns, name)))
        if method == "PATCH":
            content_type = (headers.get("Content-Type") or "").split(";")[0].strip()
            try:
                patch = yaml.safe_load(body.decode() or "{}")
            except yaml.YAMLError as exc:
                raise ApiError(400, "BadRequest", f"error decoding YAML: {exc}") from None
            if sub == "status" and content_type == "application/merge-patch+json":
                return _json(200, self._patch_status(t, ns, name, patch, query.get("fieldManager") or "unknown"))
            if sub or content_type != "application/apply-patch+yaml":
                raise ApiError(415, "UnsupportedMediaType",
                               f"this fake API server implements only server-side apply (got {content_type})")
            force = query.get("force", "").lower() in ("true", "1")
            dry_run = query.get("dryRun") == "All"
            return _json(200, self._apply(t, ns, name, patch, query.get("fieldManager", ""), force, dry_run,
                                          query.get("fieldValidation", "")))
        if method == "DELETE" and name and not sub:
            return _json(200, self._delete(t, ns, name))
        raise ApiError(405, "MethodNotAllowed", f"{method} is not implemented by this fake API server")

    def _discovery(self, parts: list[str]) -> dict:
        if parts == ["version"]:
            return {"major": "1", "minor": "33", "gitVersion": "v1.33.0-fake-apiserver", "platform": "linux/amd64"}
        if parts == ["api"]:
            return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}
        if parts == ["apis"]:
            groups: dict[str, list[str]] = {}
            for t in self.types:
                if t.group and t.version not in groups.setdefault(t.group, []):
                    groups[t.group].append(t.version)
            return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [
                {"name": g, "versions": [{"groupVersion": f"{g}/{v}", "version": v} for v in vs],
                 "preferredVersion": {"groupVersion": f"{g}/{vs[0]}", "version": vs[0]}}
                for g, vs in groups.items()]}
        group, version = ("", parts[1]) if parts[0] == "api" else (parts[1], parts[2])
        types = [t for t in self.types if (t.group, t.version) == (group, version)]
        if not types:
            raise ApiError(404, "NotFound", "the server could not find the requested resource")
        resources = []
        for t in types:
            resources.append({"name": t.plural, "singularName": t.kind.lower(), "namespaced": t.namespaced,
                              "kind": t.kind, "verbs": ["delete", "get", "list", "patch"]})
            for sub in t.subresources:
                resources.append({"name": f"{t.plural}/{sub}", "singularName": "", "namespaced": t.namespaced,
                                  "kind": t.kind, "verbs": ["get", "patch"] if sub == "status" else ["get"]})
        return {"kind": "APIResourceList", "apiVersion": "v1",
                "groupVersion": f"{group}/{version}" if group else version, "resources": resources}


def _spec_changed(a: dict, b: dict) -> bool:
    return {k: v for k, v in a.items() if k not in ("metadata", "status")} != \
        {k: v for k, v in b.items() if k not in ("metadata", "status")}


def _merge(target: dict, patch: dict) -> None:
    """JSON merge patch (RFC 7386)."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            _merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)


def _json(code: int, obj: dict) -> tuple[int, str, bytes]:
    return code, "application/json", json.dumps(obj).encode()


class _Handler(BaseHTTPRequestHandler):
    api: FakeApiServer
    protocol_version = "HTTP/1.1"  # keep-alive, as urllib3's pool expects
    disable_nagle_algorithm = True  # headers and body go out in two writes: no 40 ms delayed-ACK stalls

    def _serve(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        self.api._request.warnings = []
        code, content_type, payload = self.api.handle(self.command, self.path, self.headers, body)
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        for warning in self.api._request.warnings:
            self.send_header("Warning", f'299 - "{warning}"')
        if isinstance(payload, bytes):
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        try:
            for chunk in payload:
                if chunk:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                    self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):  # the client stopped following
            self.close_connection = True

    do_GET = do_PATCH = do_DELETE = do_POST = do_PUT = _serve

    def log_message(self, format, *args):  # quiet: tests read fake.requests instead
        pass
