"""Fixtures for the deploy tests: the FAKE API server stand-in (tests/fake_apiserver.py), seeded with a
namespace, GPU nodes, a Secret and a KubeRay operator Deployment, and `rollfleet` run in-process against it.

Nothing here talks to a real Kubernetes API server. No operator runs: tests play KubeRay by setting
status and creating pods (`kuberay_stand_in`). Every wait uses a short timeout.
"""

from __future__ import annotations

import base64

import pytest
import yaml

from fake_apiserver import FakeApiServer
from rollfleet import cli
from rollfleet.deploy import watch

H100 = "NVIDIA-H100-80GB-HBM3"
GPU = "nvidia.com/gpu"
# A stand-in for a token: the tests check it never reaches any output. Not a credential of anything.
SENTINEL = "SENTINEL-NOT-A-REAL-TOKEN-7f3a"
LABELS = {"app.kubernetes.io/name": "rollfleet", "app.kubernetes.io/instance": "smoke",
          "app.kubernetes.io/managed-by": "rollfleet"}
VALUES = {
    "name": "smoke", "namespace": "rl",
    "pools": {"trainer": {"nodes": 1, "gpusPerNode": 1, "cpu": "2", "memory": "8Gi", "shmSize": "1Gi"},
              "inference": {"nodes": 1, "gpusPerNode": 2, "cpu": "2", "memory": "8Gi", "shmSize": "1Gi"}},
    "model": {"name": "Qwen/Qwen2.5-0.5B-Instruct", "hfTokenSecret": {"name": "hf-token", "key": "token"}},
    "timeouts": {"initSeconds": 1},
}


@pytest.fixture(autouse=True)
def fast_polls(monkeypatch):
    monkeypatch.setattr(watch, "POLL_SECONDS", 0.02)


@pytest.fixture
def fake(crds):
    server = FakeApiServer(crds=crds).start()
    yield server
    server.stop()


def gpu_node(name: str, gpus: int = 8, product: str | None = H100, taints=(), labels=None, ready=True,
             unschedulable=False) -> dict:
    node_labels = {"kubernetes.io/hostname": name, **({"nvidia.com/gpu.product": product} if product else {}),
                   **(labels or {})}
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": node_labels},
            "spec": {"taints": list(taints), **({"unschedulable": True} if unschedulable else {})},
            "status": {"allocatable": {"cpu": "96", "memory": "900Gi", GPU: str(gpus)},
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


HELM_OPERATOR_LABELS = {"app.kubernetes.io/name": "kuberay-operator", "app.kubernetes.io/instance": "kuberay-operator",
                        "app.kubernetes.io/managed-by": "Helm"}  # KubeRay v1.7.0's chart, on the Deployment
KUSTOMIZE_OPERATOR_LABELS = {"app.kubernetes.io/name": "kuberay", "app.kubernetes.io/component": "kuberay-operator"}


def operator_deployment(available: int = 1, namespace: str = "kuberay-system", labels=None) -> dict:
    """KubeRay's operator as its Helm chart labels it (no pods run here: only the status says so)."""
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "kuberay-operator", "namespace": namespace, "labels": labels or HELM_OPERATOR_LABELS},
            "spec": {"replicas": 1}, "status": {"replicas": 1, "availableReplicas": available}}


def seed(fake: FakeApiServer, namespace="rl", nodes=None, secret_keys=("token",), operator=True) -> FakeApiServer:
    fake.add({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    for node in [gpu_node("gpu-a")] if nodes is None else nodes:
        fake.add(node)
    if secret_keys is not None:
        value = base64.b64encode(SENTINEL.encode()).decode()
        fake.add({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                  "metadata": {"name": "hf-token", "namespace": namespace}, "data": dict.fromkeys(secret_keys, value)})
    if operator:
        fake.add(operator_deployment())
    return fake


@pytest.fixture
def cluster(fake):
    return seed(fake)


@pytest.fixture
def values_file(tmp_path):
    def write(**overrides) -> str:
        values = yaml.safe_load(yaml.safe_dump(VALUES))
        for dotted, value in overrides.items():
            node = values
            *parents, last = dotted.split("__")
            for part in parents:
                node = node.setdefault(part, {})
            node[last] = value
        path = tmp_path / "values.yaml"
        path.write_text(yaml.safe_dump(values))
        return str(path)
    return write


@pytest.fixture
def kubeconfig(fake, tmp_path) -> str:
    return str(fake.write_kubeconfig(tmp_path / "kubeconfig"))


@pytest.fixture
def rollfleet(kubeconfig, capsys, values_file):
    """Run `rollfleet <command> [-f values.yaml] --kubeconfig <the stand-in> ...` in-process.
    `values`: True = the fixture's values file, a path, or None = no values file."""
    def run(command: str, *args: str, values: str | bool | None = True):
        chosen = values_file() if values is True else values
        rc = cli.main([command, *(["-f", chosen] if chosen else []), "--kubeconfig", kubeconfig, *args])
        out, err = capsys.readouterr()
        assert SENTINEL not in out + err and base64.b64encode(SENTINEL.encode()).decode() not in out + err
        assert "Traceback" not in out + err
        return rc, out, err
    return run


def writes(fake) -> list[tuple[str, str]]:
    return [(m, p) for m, p in fake.requests if m in ("PATCH", "DELETE", "POST", "PUT") and "dryRun" not in p]


def ready_pod(name: str, component: str, namespace="rl", instance="smoke", ready=True, **status) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": namespace,
                         "labels": {**LABELS, "app.kubernetes.io/instance": instance,
                                    "app.kubernetes.io/component": component}},
            "spec": {"containers": [{"name": "ray-head" if component == "head" else "ray-worker"}]},
            "status": {"phase": "Running" if ready else "Pending",
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}], **status}}


def kuberay_stand_in(job_status="RUNNING", deployment="Running"):
    """An on_write hook playing the KubeRay operator: on a RayJob, its cluster comes up."""
    def on_write(server: FakeApiServer, obj: dict) -> None:
        if obj["kind"] != "RayJob":
            return
        meta = obj["metadata"]
        for component in ("head", "trainer", "inference"):
            server.add(ready_pod(f"{meta['name']}-{component}", component, meta["namespace"], meta["name"]))
        server.set_status("RayJob", meta["name"], meta["namespace"], {
            "jobDeploymentStatus": deployment, "jobStatus": job_status, "rayClusterName": f"{meta['name']}-abcde",
            "rayClusterStatus": {"state": "ready"}}, manager="kuberay-operator")
    return on_write
