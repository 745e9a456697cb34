"""The API server as plain dicts, and the errors of talking to it.

Everything goes through the `kubernetes` client's dynamic API: no kubectl, no helm, no
kuberay-python-client (not on PyPI). The client is imported inside functions so `rollfleet --help`
stays fast.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rollfleet.spec import KUBERAY_VERSION

FIELD_MANAGER = "rollfleet"
API_VERSIONS = {"ConfigMap": "v1", "RayJob": "ray.io/v1", "RayCluster": "ray.io/v1", "Namespace": "v1",
                "Secret": "v1", "Node": "v1", "Pod": "v1", "Event": "v1", "Deployment": "apps/v1",
                "NetworkPolicy": "networking.k8s.io/v1", "PodMonitor": "monitoring.coreos.com/v1",
                "PrometheusRule": "monitoring.coreos.com/v1"}
MONITORING_FIX = ("install the Prometheus Operator's CRDs (kube-prometheus-stack brings them), or set "
                  "monitoring.podMonitor.enabled and monitoring.alerts.enabled to false")
KUBERAY_INSTALL = (f"helm install kuberay-operator kuberay/kuberay-operator --version {KUBERAY_VERSION[1:]} "
                   "(helm repo add kuberay https://ray-project.github.io/kuberay-helm/)")
REQUEST_TIMEOUT = 30  # seconds, each API request
SERVICE_ACCOUNT_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class KubeError(Exception):
    """Cannot talk to the cluster at all (no kubeconfig, unreachable API server)."""


class NotServed(KubeError):
    """The cluster does not serve a kind rollfleet needs (KubeRay's CRDs are not installed)."""


def api_message(exc) -> str:
    """The `message` of the Status object an API error carries, else what the client says."""
    try:
        return json.loads(exc.body)["message"]
    except (TypeError, ValueError, KeyError):
        return str(exc.body or exc.reason)


@dataclass
class Kube:
    """The dynamic client, returning plain dicts. Discovery is cached per process only, so CRDs
    installed a moment ago are seen. `where` names the server and context in messages; `namespace`
    is the context's namespace (kubectl's default for -n); `warnings` collects the API server's
    `Warning` headers."""

    api_client: Any
    where: str
    namespace: str | None = None
    warnings: list[str] = field(default_factory=list)

    def __post_init__(self):
        from kubernetes.dynamic import DynamicClient

        self._cache = tempfile.TemporaryDirectory(prefix="rollfleet-discovery-")
        self.dyn = DynamicClient(self.api_client, cache_file=os.path.join(self._cache.name, "discovery.json"))

    def _call(self, fn, **kwargs) -> Any:
        resp = fn(serialize=False, _request_timeout=REQUEST_TIMEOUT, **kwargs)
        headers = getattr(resp, "headers", None)
        if headers is not None and hasattr(headers, "getlist"):
            self.warnings += [w.split(" ", 2)[-1].strip('"') for w in headers.getlist("Warning")]
        return json.loads(resp.data)

    def raw(self, path: str) -> dict:
        return self._call(lambda **kw: self.dyn.request("get", path, **kw))

    def resource(self, kind: str, api_version: str | None = None):
        from kubernetes.dynamic.exceptions import ResourceNotFoundError

        api_version = api_version or API_VERSIONS[kind]
        try:
            return self.dyn.resources.get(api_version=api_version, kind=kind)
        except ResourceNotFoundError:
            if api_version.startswith("ray.io/"):
                raise NotServed(f"{self.where} does not serve {kind} ({api_version}); install the KubeRay "
                                f"operator {KUBERAY_VERSION} with its CRDs: {KUBERAY_INSTALL}") from None
            if api_version.startswith("monitoring.coreos.com/"):
                raise NotServed(f"{self.where} does not serve {kind} ({api_version}); {MONITORING_FIX}") from None
            raise NotServed(f"{self.where} does not serve {kind} ({api_version})") from None

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
        """Server-side apply as FIELD_MANAGER; unknown fields are refused (fieldValidation=Strict),
        never silently dropped."""
        return self._call(self.resource(obj["kind"], obj["apiVersion"]).server_side_apply, body=obj,
                          namespace=obj["metadata"].get("namespace"), field_manager=FIELD_MANAGER,
                          force_conflicts=True if force else None, dry_run="All" if dry_run else None,
                          query_params=[("fieldValidation", "Strict")])

    def delete(self, kind: str, name: str, namespace: str) -> None:
        self._call(self.resource(kind).delete, name=name, namespace=namespace, propagation_policy="Background")

    def log(self, pod: str, namespace: str, container: str, tail: int) -> str:
        resp = self.dyn.request("get", f"/api/v1/namespaces/{namespace}/pods/{pod}/log", serialize=False,
                                query_params=[("container", container), ("tailLines", tail)],
                                _request_timeout=REQUEST_TIMEOUT)
        return resp.data.decode(errors="replace")

    def follow(self, pod: str, namespace: str, container: str, tail: int) -> Iterator[str]:
        """The pod's log from the last `tail` lines on, line by line, until the container ends (a
        stream: no read timeout)."""
        resp = self.dyn.request("get", f"/api/v1/namespaces/{namespace}/pods/{pod}/log", serialize=False,
                                query_params=[("container", container), ("tailLines", tail), ("follow", "true")],
                                _request_timeout=(REQUEST_TIMEOUT, None))
        pending = b""
        for chunk in resp.stream(4096, decode_content=True):
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line.decode(errors="replace") + "\n"
        if pending:
            yield pending.decode(errors="replace")


def kubeconfig_files(explicit: str | None) -> tuple[list[Path], str]:
    """The kubeconfig files to read and where that list came from (for messages), as kubectl picks
    them: --kubeconfig, else $KUBECONFIG (':'-separated), else ~/.kube/config."""
    if explicit:
        return [Path(explicit).expanduser()], "--kubeconfig"
    if os.environ.get("KUBECONFIG"):
        return [Path(p).expanduser() for p in os.environ["KUBECONFIG"].split(os.pathsep) if p], "$KUBECONFIG"
    return [Path("~/.kube/config").expanduser()], "the default location"


def connect(kubeconfig: str | None, context: str | None) -> Kube:
    """A client for `context` (default: the current one) of the kubeconfig kubectl would read; inside a
    pod with no kubeconfig, the pod's service account. Raises KubeError with one line that names the
    file, the context or the server, and what to change."""
    from kubernetes import client, config
    from urllib3.exceptions import HTTPError

    files, source = kubeconfig_files(kubeconfig)
    present = [f for f in files if f.is_file()]
    in_cluster = os.environ.get("KUBERNETES_SERVICE_HOST") and source == "the default location"
    if not present and not in_cluster:
        names = ", ".join(str(f) for f in files)
        fix = ("pass --kubeconfig with an existing file" if source == "--kubeconfig" else
               "point KUBECONFIG at an existing file" if source == "$KUBECONFIG" else
               "pass --kubeconfig, set KUBECONFIG, or run inside a pod with a service account")
        raise KubeError(f"kubeconfig file {names} (from {source}) does not exist; {fix}")
    if present:
        config_file = os.pathsep.join(str(f) for f in present)
        try:
            contexts, current = config.list_kube_config_contexts(config_file=config_file)
            names = [c["name"] for c in contexts]
            if context and context not in names:
                raise KubeError(f"context {context!r} is not in kubeconfig {config_file}; its contexts: "
                                f"{', '.join(names) or '(none)'}; pass one of them with --context")
            chosen = next(c for c in contexts if c["name"] == (context or (current or {}).get("name")))
            api = config.new_client_from_config(config_file=config_file, context=chosen["name"])
        except (config.ConfigException, StopIteration, ValueError, OSError) as exc:
            raise KubeError(f"kubeconfig {config_file} is not usable ({exc or 'no current context'}); fix the file "
                            f"or pass --kubeconfig / --context") from None
        where = f"{api.configuration.host} (context {chosen['name']})"
        namespace = (chosen.get("context") or {}).get("namespace")
    else:
        configuration = client.Configuration()
        try:
            config.load_incluster_config(client_configuration=configuration)
        except config.ConfigException as exc:
            raise KubeError(f"no kubeconfig at {files[0]} and the pod's service account is not usable ({exc}); "
                            f"pass --kubeconfig or set KUBECONFIG") from None
        api, where = client.ApiClient(configuration), "the in-cluster API server (service account)"
        namespace = SERVICE_ACCOUNT_NAMESPACE.read_text().strip() if SERVICE_ACCOUNT_NAMESPACE.is_file() else None
    bound_requests(api)
    try:
        return Kube(api, where, namespace)
    except (HTTPError, ValueError) as exc:
        raise KubeError(f"cannot reach the Kubernetes API server at {where}: {exc}; check --context / "
                        f"--kubeconfig and that the cluster is up") from None
    except client.ApiException as exc:  # discovery refused: expired or wrong credentials, RBAC
        raise KubeError(f"the Kubernetes API server at {where} refused discovery ({exc.status} {exc.reason}: "
                        f"{api_message(exc)}); refresh the credentials of the context or pass another "
                        f"--context") from None


def bound_requests(api) -> None:
    """Every request of `api` gets REQUEST_TIMEOUT unless it sets its own: the dynamic client's
    discovery requests (/version, /apis, ...) set none, and a server that accepts the connection and
    never answers would hang them."""
    request = api.rest_client.request

    def bounded(*args, _request_timeout=None, **kwargs):
        return request(*args, _request_timeout=REQUEST_TIMEOUT if _request_timeout is None else _request_timeout,
                       **kwargs)

    api.rest_client.request = bounded
