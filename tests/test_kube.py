"""rollfleet deploy / status / logs / down, against the FAKE API server stand-in (tests/fake_apiserver.py).

Nothing here talks to a real Kubernetes API server; the stand-in implements the endpoints kube.py uses
with Kubernetes semantics (discovery, server-side apply with field managers, selectors, status, delete).
No operator runs: tests play KubeRay by setting status and creating pods. Every wait uses a short timeout.
"""

from __future__ import annotations

import base64
import re
import subprocess
import sys

import pytest
import yaml

from fake_apiserver import CORE, FakeApiServer, kuberay
from rollfleet import cli, kube
from rollfleet.render import load_values
from rollfleet.spec import Pool, Toleration

H100 = "NVIDIA-H100-80GB-HBM3"
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


# ---- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(autouse=True)
def fast_polls(monkeypatch):
    monkeypatch.setattr(kube, "POLL_SECONDS", 0.02)


@pytest.fixture
def fake():
    server = FakeApiServer().start()
    yield server
    server.stop()


def gpu_node(name: str, gpus: int = 8, product: str | None = H100, taints=(), labels=None, ready=True,
             unschedulable=False) -> dict:
    node_labels = {"kubernetes.io/hostname": name, **({"nvidia.com/gpu.product": product} if product else {}),
                   **(labels or {})}
    return {"apiVersion": "v1", "kind": "Node", "metadata": {"name": name, "labels": node_labels},
            "spec": {"taints": list(taints), **({"unschedulable": True} if unschedulable else {})},
            "status": {"allocatable": {"cpu": "96", "memory": "900Gi", kube.GPU: str(gpus)},
                       "conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def seed(fake: FakeApiServer, namespace="rl", nodes=None, secret_keys=("token",)) -> FakeApiServer:
    fake.add({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": namespace}})
    for node in [gpu_node("gpu-a")] if nodes is None else nodes:
        fake.add(node)
    if secret_keys is not None:
        value = base64.b64encode(SENTINEL.encode()).decode()
        fake.add({"apiVersion": "v1", "kind": "Secret", "type": "Opaque",
                  "metadata": {"name": "hf-token", "namespace": namespace}, "data": dict.fromkeys(secret_keys, value)})
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
def rollfleet(fake, tmp_path, capsys, values_file):
    """Run `rollfleet <command> -f values.yaml --kubeconfig <the stand-in>` in-process."""
    kubeconfig = fake.write_kubeconfig(tmp_path / "kubeconfig")

    def run(command: str, *args: str, values: str | None = None):
        rc = cli.main([command, "-f", values or values_file(), "--kubeconfig", str(kubeconfig), *args])
        out, err = capsys.readouterr()
        assert SENTINEL not in out + err and base64.b64encode(SENTINEL.encode()).decode() not in out + err
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


# ---- preflight: the GPU arithmetic (pure) -------------------------------------------------------

def node(name, gpus=8, used=0, product=H100, taints=(), schedulable=True, **labels) -> kube.NodeInfo:
    return kube.NodeInfo(name, {**({"nvidia.com/gpu.product": product} if product else {}), **labels}, gpus, used,
                         tuple(taints), schedulable)


def pools(trainer=(1, 4), inference=(1, 4), **kw) -> dict[str, Pool]:
    return {"trainer": Pool(nodes=trainer[0], gpus_per_node=trainer[1], **kw.get("trainer_kw", {})),
            "inference": Pool(nodes=inference[0], gpus_per_node=inference[1], **kw.get("inference_kw", {}))}


def by_pool(fits):
    return {f.pool: f for f in fits}


def test_gpu_plan_both_pools_share_one_8_gpu_node():
    fits = by_pool(kube.plan_gpus(pools(), [node("a")]))
    assert fits["trainer"].ok and fits["inference"].ok
    assert (fits["trainer"].need, fits["trainer"].free, fits["trainer"].placed) == (4, 8, 1)
    assert fits["trainer"].shared


def test_gpu_plan_a_pod_needs_its_gpus_on_one_node():
    # 2 nodes × 3 free = 6 GPUs in total, but a 4-GPU pod fits on neither.
    fits = by_pool(kube.plan_gpus(pools(trainer=(1, 4), inference=(1, 1)), [node("a", 3), node("b", 3)]))
    assert not fits["trainer"].ok and fits["trainer"].free == 6 and fits["trainer"].placed == 0
    assert fits["inference"].ok


def test_gpu_plan_a_node_hosts_as_many_pods_as_fit():
    fits = by_pool(kube.plan_gpus(pools(trainer=(2, 4), inference=(1, 1)), [node("a", 8)]))
    assert fits["trainer"].placed == 2 and fits["inference"].placed == 0
    # best fit: both trainer pods share node a, which leaves node b whole for the 8-GPU inference pod
    fits = by_pool(kube.plan_gpus(pools(trainer=(2, 4), inference=(1, 8)), [node("a", 8), node("b", 8)]))
    assert fits["trainer"].ok and fits["inference"].ok


def test_gpu_plan_counts_gpus_other_pods_hold():
    fits = by_pool(kube.plan_gpus(pools(), [node("a", 8, used=6)]))
    assert fits["trainer"].free == 2 and not fits["trainer"].ok and not fits["inference"].ok


def test_gpu_plan_selects_by_gpu_product_and_node_selector():
    nodes = [node("a100", product="NVIDIA-A100-SXM4-80GB"), node("h100", pool="rl"), node("h100-other", pool="web")]
    fits = by_pool(kube.plan_gpus(pools(trainer_kw={"node_selector": {"pool": "rl"}}), nodes))
    assert fits["trainer"].nodes == ("h100",)
    assert fits["inference"].nodes == ("h100", "h100-other")
    fits = by_pool(kube.plan_gpus(pools(inference_kw={"gpu_product": None}), nodes))
    assert fits["inference"].nodes == ("a100", "h100", "h100-other")


def test_gpu_plan_tolerates_the_gpu_taint_and_the_pools_tolerations_only():
    gpu_taint = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
    dedicated = {"key": "dedicated", "value": "rl-train", "effect": "NoSchedule"}
    soft = {"key": "soft", "effect": "PreferNoSchedule"}
    nodes = [node("gpu", taints=[gpu_taint, soft]), node("train", taints=[dedicated])]
    tol = [Toleration(key="dedicated", operator="Equal", value="rl-train", effect="NoSchedule")]
    fits = by_pool(kube.plan_gpus(pools(trainer_kw={"tolerations": tol}), nodes))
    assert fits["trainer"].nodes == ("gpu", "train")
    assert fits["inference"].nodes == ("gpu",)


def test_gpu_plan_skips_cordoned_or_not_ready_nodes():
    fits = by_pool(kube.plan_gpus(pools(), [node("a", schedulable=False)]))
    assert fits["trainer"].nodes == () and not fits["trainer"].ok
    assert "no schedulable node matches" in kube.gpu_problem(fits["trainer"])


@pytest.mark.parametrize("toleration, taint, expected", [
    ({"operator": "Exists"}, {"key": "x", "effect": "NoSchedule"}, True),
    ({"key": "x", "operator": "Exists"}, {"key": "x", "value": "1", "effect": "NoExecute"}, True),
    ({"key": "x", "operator": "Equal", "value": "1"}, {"key": "x", "value": "2", "effect": "NoSchedule"}, False),
    ({"key": "x", "operator": "Equal", "value": "1", "effect": "NoExecute"},
     {"key": "x", "value": "1", "effect": "NoSchedule"}, False),
    ({"key": "y", "operator": "Exists"}, {"key": "x", "effect": "NoSchedule"}, False),
    ({"key": "y", "operator": "Exists"}, {"key": "x", "effect": "PreferNoSchedule"}, True),
])
def test_tolerates(toleration, taint, expected):
    assert kube.tolerates([toleration], taint) is expected


def test_gpu_table_shows_need_and_have_per_pool():
    table = kube.gpu_table(kube.plan_gpus(pools(trainer=(1, 4), inference=(2, 4)), [node("a", 8)]))
    lines = table.splitlines()
    assert lines[0].split() == ["pool", "node", "selector", "need", "matching", "nodes", "free", "GPUs", "there",
                                "pods", "that", "fit"]
    assert lines[1].split()[:2] == ["trainer", f"nvidia.com/gpu.product={H100}"]
    assert "1 pod × 4 = 4 GPU" in lines[1] and re.search(r" 1 +8 +1/1 +ok$", lines[1])
    assert "2 pods × 4 = 8 GPU" in lines[2] and re.search(r" 1 +8 +1/2 +NOT ENOUGH$", lines[2])


def test_pod_gpus_counts_requests_or_limits():
    pod = {"spec": {"containers": [{"resources": {"limits": {kube.GPU: "2"}}},
                                   {"resources": {"requests": {kube.GPU: "1"}, "limits": {kube.GPU: "1"}}}, {}]}}
    assert kube.pod_gpus(pod) == 3


# ---- preflight: every failure, through `rollfleet deploy` ---------------------------------------

@pytest.mark.parametrize("types, says", [
    (CORE, "the ray.io API group is not served: KubeRay's CRDs are not installed"),
    (CORE + kuberay("v1alpha1"), "the ray.io API group serves only v1alpha1 (an older KubeRay)"),
])
def test_preflight_missing_kuberay_crds(types, says, tmp_path, capsys, values_file):
    fake = seed(FakeApiServer(types).start())
    try:
        rc = cli.main(["deploy", "-f", values_file(), "--kubeconfig", str(fake.write_kubeconfig(tmp_path / "kc"))])
        err = capsys.readouterr().err
    finally:
        fake.stop()
    assert rc == kube.NOTHING_APPLIED
    assert ("error: KubeRay CRDs rayjobs.ray.io, rayclusters.ray.io are not served at ray.io/v1 (" + says) in err
    assert "helm install kuberay-operator kuberay/kuberay-operator --version 1.7.0" in err
    assert "error: nothing applied (1 problem)" in err
    assert writes(fake) == []


def test_preflight_one_crd_missing(tmp_path, capsys, values_file):
    fake = seed(FakeApiServer(CORE + kuberay()[:1]).start())  # rayclusters only
    try:
        kubeconfig = str(fake.write_kubeconfig(tmp_path / "kc"))
        rc = cli.main(["deploy", "-f", values_file(), "--kubeconfig", kubeconfig])
        err = capsys.readouterr().err
        assert rc == 2 and "error: KubeRay CRD rayjobs.ray.io is not served at ray.io/v1" in err
        # a standalone RayCluster needs only its own CRD
        rc = cli.main(["deploy", "-f", values_file(job__enabled=False), "--kubeconfig", kubeconfig, "--wait", "none"])
        assert rc == 0, capsys.readouterr().err
    finally:
        fake.stop()


def test_preflight_missing_namespace(fake, rollfleet):
    seed(fake, namespace="other")
    rc, out, err = rollfleet("deploy")
    assert rc == 2
    assert ("error: namespace 'rl' does not exist; create it (kubectl create namespace rl) "
            "or set `namespace:` in the values") in err
    assert writes(fake) == []


def test_preflight_missing_secret(fake, rollfleet):
    seed(fake, secret_keys=None)
    rc, out, err = rollfleet("deploy")
    assert rc == 2
    assert ("error: Secret rl/hf-token (model.hfTokenSecret.name) does not exist; create it: kubectl -n rl create "
            "secret generic hf-token --from-file=token=<a file holding the token>") in err
    assert writes(fake) == []


def test_preflight_secret_without_the_key_names_keys_never_values(fake, rollfleet):
    seed(fake, secret_keys=("HF_TOKEN", "other"))
    rc, out, err = rollfleet("deploy")  # the fixture asserts the value appears nowhere
    assert rc == 2
    assert ("error: Secret rl/hf-token has no key 'token' (model.hfTokenSecret.key); its keys: HF_TOKEN, other; "
            "set model.hfTokenSecret.key to one of them or add the key") in err


def test_preflight_missing_pull_secret(cluster, rollfleet, values_file):
    rc, out, err = rollfleet("deploy", values=values_file(image={"pullSecrets": ["registry-creds"]}))
    assert rc == 2
    assert "error: Secret rl/registry-creds (image.pullSecrets[0].name) does not exist" in err


def test_preflight_not_enough_gpus_prints_the_table(fake, rollfleet, values_file):
    seed(fake, nodes=[gpu_node("gpu-a", gpus=8), gpu_node("a100", product="NVIDIA-A100-SXM4-80GB")])
    fake.add({**ready_pod("someone-else", "trainer", namespace="other", instance="other"),
              "spec": {"nodeName": "gpu-a", "containers": [{"name": "c", "resources": {"limits": {kube.GPU: "6"}}}]}})
    rc, out, err = rollfleet("deploy", values=values_file(pools__trainer__gpuProduct=H100,
                                                          pools__inference__gpuProduct=H100))
    assert rc == 2
    table = out.split("\n", 1)[1]
    assert "pool       node selector" in table
    assert "trainer    nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3  1 pod × 1 = 1 GPU" in table
    assert re.search(r"1/1 +ok", table) and re.search(r"0/1 +NOT ENOUGH", table)
    assert ("error: pools.inference: needs 1 pod(s) with 2 free nvidia.com/gpu each on one node, but only 0 fit on "
            "1 matching node (shared with the other pool, whose pods were placed too) (2 GPUs free there); "
            "free GPUs there, add nodes, or lower pools.inference.nodes / pools.inference.gpusPerNode") in err
    assert writes(fake) == []


def test_preflight_reports_every_problem_at_once(fake, rollfleet, values_file):
    seed(fake, namespace="rl", nodes=[], secret_keys=("nope",))
    rc, out, err = rollfleet("deploy", values=values_file(image={"pullSecrets": ["regcred"]}))
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert rc == 2
    assert [e.split()[1] for e in errors] == ["Secret", "Secret", "pools.trainer:", "pools.inference:", "nothing"]
    assert errors[-1] == "error: nothing applied (4 problems)"
    assert writes(fake) == []


def test_preflight_forbidden_checks_are_warnings(cluster, rollfleet):
    cluster.forbidden.add(("list", "nodes"))
    cluster.on_write = kuberay_stand_in()
    rc, out, err = rollfleet("deploy")
    assert rc == 0, err
    assert 'warning: GPU capacity not checked: nodes is forbidden: User "fake-user" cannot list resource "nodes"' in err


def test_skip_gpu_check(fake, rollfleet):
    seed(fake, nodes=[])
    fake.on_write = kuberay_stand_in()
    assert rollfleet("deploy")[0] == 2
    rc, out, err = rollfleet("deploy", "--skip-gpu-check")
    assert rc == 0, err
    assert "node selector" not in out


def test_unreachable_api_server(tmp_path, capsys, values_file):
    fake = FakeApiServer().start()
    kubeconfig = fake.write_kubeconfig(tmp_path / "kc")
    fake.stop()
    rc = cli.main(["deploy", "-f", values_file(), "--kubeconfig", str(kubeconfig)])
    assert rc == 2
    assert "error: cannot reach the Kubernetes API server at http://127.0.0.1:" in capsys.readouterr().err


def test_no_kubeconfig(tmp_path, capsys, values_file, monkeypatch):
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    rc = cli.main(["status", "-f", values_file(), "--kubeconfig", str(tmp_path / "missing")])
    assert rc == 2 and "error: no usable kubeconfig" in capsys.readouterr().err


# ---- apply: server-side, idempotent, conflicts --------------------------------------------------

def test_deploy_applies_waits_and_a_second_deploy_changes_nothing(cluster, rollfleet):
    cluster.on_write = kuberay_stand_in()
    rc, out, err = rollfleet("deploy")
    assert rc == 0, err
    assert out.startswith(f"preflight against {cluster.url} (context fake-apiserver), namespace rl\n")
    assert "ConfigMap rl/smoke-config: created" in out and "RayJob rl/smoke: created" in out
    assert "waiting up to 1s for RayJob rl/smoke to be running (jobDeploymentStatus Running" in out
    assert "deployment Running, job RUNNING; RayCluster smoke-abcde: ready; pods ready: head 1/1, trainer 1/1, " \
           "inference 1/1" in out
    rayjob = cluster.get("RayJob", "smoke", "rl")
    managers = {(m["manager"], m["operation"]) for m in rayjob["metadata"]["managedFields"]}
    assert managers == {("rollfleet", "Apply"), ("kuberay-operator", "Update")}
    assert all("fieldManager=rollfleet" in p and "force" not in p for m, p in writes(cluster) if m == "PATCH")

    before = len(writes(cluster))
    versions = {k: o["metadata"]["resourceVersion"] for k, o in cluster.objects.items()}
    rc, out, err = rollfleet("deploy")
    assert rc == 0, err
    assert "ConfigMap rl/smoke-config: unchanged" in out and "RayJob rl/smoke: unchanged" in out
    assert len(writes(cluster)) == before + 3  # three no-op applies (the stand-in's hook did not fire again)
    assert {k: o["metadata"]["resourceVersion"] for k, o in cluster.objects.items()} == versions


def test_changed_values_are_configured(cluster, rollfleet, values_file):
    cluster.on_write = kuberay_stand_in()
    assert rollfleet("deploy")[0] == 0
    rc, out, err = rollfleet("deploy", "--wait", "none", values=values_file(job={"steps": 7}))
    assert rc == 0 and "ConfigMap rl/smoke-config: configured" in out
    assert '"steps": 7' in cluster.get("ConfigMap", "smoke-config", "rl")["data"]["fleet.json"]


def test_a_field_another_manager_owns_is_a_conflict_until_forced(cluster, rollfleet):
    assert rollfleet("deploy", "--wait", "none")[0] == 0
    edited = cluster.get("ConfigMap", "smoke-config", "rl")
    cluster.apply({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "smoke-config", "namespace": "rl"},
                   "data": {"fleet.json": "{}"}}, manager="kubectl-edit", force=True)
    before = len(writes(cluster))
    rc, out, err = rollfleet("deploy", "--wait", "none")
    assert rc == 2
    assert ('error: ConfigMap rl/smoke-config: Apply failed with 1 conflict: conflict with "kubectl-edit": '
            '.data.fleet.json; another field manager') in err
    assert "rerun with --force-conflicts to take them over" in err and "error: nothing applied (1 problem)" in err
    assert len(writes(cluster)) == before
    rc, out, err = rollfleet("deploy", "--wait", "none", "--force-conflicts")
    assert rc == 0 and "ConfigMap rl/smoke-config: configured" in out
    assert cluster.get("ConfigMap", "smoke-config", "rl")["data"] == edited["data"]


def test_an_object_the_api_server_rejects_writes_nothing(cluster, rollfleet):
    cluster.admission = lambda obj: ("spec.rayClusterSpec.headGroupSpec: Forbidden: a stand-in webhook says no"
                                     if obj["kind"] == "RayJob" else None)
    rc, out, err = rollfleet("deploy")
    assert rc == 2
    assert ('error: RayJob rl/smoke rejected by the API server: RayJob "smoke" is invalid: '
            'spec.rayClusterSpec.headGroupSpec: Forbidden') in err
    assert writes(cluster) == [] and cluster.get("ConfigMap", "smoke-config", "rl") is None


# ---- wait: timeouts and reasons -----------------------------------------------------------------

def test_wait_timeout_says_what_it_waited_for(cluster, rollfleet):
    rc, out, err = rollfleet("deploy", "--timeout", "0.2")
    assert rc == 1
    assert ("error: timed out after 0.2s waiting for RayJob rl/smoke to be running (jobDeploymentStatus Running: "
            "cluster ready, job submitted)") in err
    assert "error: last seen: RayJob rl/smoke: deployment -, job -; RayCluster -: -; pods ready: head 0/1" in err
    assert "error: no pod or event reports a problem" in err and "raise --timeout (or timeouts.initSeconds)" in err


def test_wait_timeout_default_comes_from_timeouts_init_seconds(cluster, rollfleet, values_file):
    rc, out, err = rollfleet("status", "--wait", "complete", values=values_file(timeouts={"initSeconds": 1}))
    assert rc == 1 and "error: timed out after 1s waiting for RayJob rl/smoke to succeed (jobDeploymentStatus " \
                       "Complete, jobStatus SUCCEEDED)" in err


def test_wait_names_the_reasons_pending_pods_give(cluster, rollfleet):
    unschedulable = "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are available."
    cluster.add(ready_pod("smoke-inference-0", "inference", ready=False, conditions=[
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": unschedulable}]))
    cluster.add(ready_pod("smoke-head-0", "head", ready=False, containerStatuses=[
        {"name": "ray-head", "state": {"waiting": {"reason": "ImagePullBackOff",
                                                   "message": 'Back-off pulling image "ghcr.io/x/y:0"'}}}]))
    cluster.add(ready_pod("smoke-trainer-0", "trainer", ready=False, containerStatuses=[
        {"name": "ray-worker", "state": {"running": {}},
         "lastState": {"terminated": {"reason": "OOMKilled", "exitCode": 137}}}]))
    cluster.add({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "smoke-x7k2p", "namespace": "rl",
                                                                   "labels": {"job-name": "smoke"}},
                 "spec": {"containers": [{"name": "ray-job-submitter"}]}, "status": {"phase": "Pending"}})
    for i, (pod, reason, message) in enumerate([
            ("smoke-inference-0", "FailedScheduling", unschedulable),
            ("smoke-head-0", "Failed", 'Failed to pull image "ghcr.io/x/y:0": not found'),
            ("smoke-x7k2p", "FailedMount", 'MountVolume.SetUp failed: configmap "nope" not found'),
            ("unrelated-pod", "FailedScheduling", "not ours")]):
        cluster.add({"apiVersion": "v1", "kind": "Event", "type": "Warning", "reason": reason, "message": message,
                     "metadata": {"name": f"ev{i}", "namespace": "rl"},
                     "involvedObject": {"kind": "Pod", "name": pod, "namespace": "rl"}})
    rc, out, err = rollfleet("deploy", "--timeout", "0.2")
    assert rc == 1
    assert ("error: pod smoke-inference-0 (pools.inference): unschedulable: 0/3 nodes are available: 3 Insufficient "
            "nvidia.com/gpu. preemption: 0/3 nodes are available.; not enough free nvidia.com/gpu on nodes matching "
            "pools.inference") in err
    assert ('error: pod smoke-head-0 (head): container ray-head ImagePullBackOff: Back-off pulling image '
            '"ghcr.io/x/y:0"; check image.repository, image.tag') in err
    assert ("error: pod smoke-trainer-0 (pools.trainer): container ray-worker was OOMKilled (out of its memory "
            "limit); raise pools.trainer.memory") in err
    assert 'error: pod smoke-head-0 (head): Failed: Failed to pull image "ghcr.io/x/y:0": not found' in err
    assert "error: pod smoke-x7k2p (job): FailedMount: MountVolume.SetUp failed" in err
    assert "not ours" not in err
    assert err.count("Insufficient nvidia.com/gpu") == 1  # the event repeats the condition: said once
    # the same problems show while waiting, as they appear
    assert "problem: pod smoke-inference-0 (pools.inference): unschedulable" in out


def test_wait_stops_at_a_failed_rayjob_with_its_reason(cluster, rollfleet):
    cluster.on_write = kuberay_stand_in(job_status="FAILED", deployment="Failed")
    rc, out, err = rollfleet("deploy", "--timeout", "30")
    assert rc == 1
    assert "error: RayJob rl/smoke failed: deployment Failed, job FAILED" in err
    assert "timed out" not in err


def test_wait_complete(cluster, rollfleet):
    cluster.on_write = kuberay_stand_in(job_status="SUCCEEDED", deployment="Complete")
    rc, out, err = rollfleet("deploy", "--wait", "complete", "--timeout", "5")
    assert rc == 0, err
    assert "RayJob rl/smoke succeeded" in out


def test_wait_for_a_standalone_raycluster(cluster, rollfleet, values_file):
    def operator(server, obj):
        if obj["kind"] == "RayCluster":
            server.set_status("RayCluster", "smoke", "rl", {"state": "ready", "conditions": [
                {"type": "RayClusterProvisioned", "status": "True"}]})
    cluster.on_write = operator
    values = values_file(job={"enabled": False})
    rc, out, err = rollfleet("deploy", values=values)
    assert rc == 0, err
    assert "RayCluster rl/smoke: created" in out and "RayCluster rl/smoke to be ready" in out
    rc, out, err = rollfleet("deploy", "--wait", "complete", values=values)
    assert rc == 2 and "a standalone RayCluster never completes; use --wait ready" in err


# ---- status, logs ------------------------------------------------------------------------------

def test_status(cluster, rollfleet):
    rc, out, err = rollfleet("status")
    assert rc == 1 and "ConfigMap rl/smoke-config: absent" in out and "RayJob rl/smoke: not found" in out
    cluster.on_write = kuberay_stand_in()
    rollfleet("deploy")
    rc, out, err = rollfleet("status")
    assert rc == 0
    assert "RayJob rl/smoke: present (resourceVersion" in out and "deployment Running, job RUNNING" in out


def test_logs_prints_the_submitter_or_a_component(cluster, rollfleet):
    rc, out, err = rollfleet("logs")
    assert rc == 1 and "error: no submitter pod in namespace rl (labels job-name=smoke)" in err
    cluster.add({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "smoke-x7k2p", "namespace": "rl",
                                                                   "labels": {"job-name": "smoke"}},
                 "spec": {"containers": [{"name": "ray-job-submitter"}]}})
    cluster.logs[("rl", "smoke-x7k2p", "ray-job-submitter")] = "".join(f"line {i}\n" for i in range(10)) + "step 3 ok\n"
    cluster.add(ready_pod("smoke-head-0", "head"))
    cluster.logs[("rl", "smoke-head-0", "ray-head")] = "head says hi\n"
    rc, out, err = rollfleet("logs", "--tail", "2")
    assert rc == 0
    assert out == "==> pod smoke-x7k2p, container ray-job-submitter (last 2 lines) <==\nline 9\nstep 3 ok\n"
    rc, out, err = rollfleet("logs", "--component", "head")
    assert rc == 0 and out.endswith("head says hi\n")


# ---- down --------------------------------------------------------------------------------------

def test_down_deletes_only_this_instances_labelled_objects_of_its_kinds(cluster, rollfleet):
    cluster.on_write = kuberay_stand_in()
    assert rollfleet("deploy")[0] == 0
    rayjob = cluster.get("RayJob", "smoke", "rl")
    owned = {"apiVersion": "ray.io/v1", "kind": "RayCluster",
             "metadata": {"name": "smoke-abcde", "namespace": "rl", "labels": LABELS, "ownerReferences": [
                 {"apiVersion": "ray.io/v1", "kind": "RayJob", "name": "smoke", "uid": rayjob["metadata"]["uid"],
                  "controller": True}]}}
    cluster.add(owned)
    keep = [
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "other-config", "namespace": "rl", "labels": {
            **LABELS, "app.kubernetes.io/instance": "other"}}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "helm-config", "namespace": "rl", "labels": {
            **LABELS, "app.kubernetes.io/managed-by": "Helm"}}},
        {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "smoke-config", "namespace": "default",
                                                               "labels": LABELS}},
        {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "unlabelled", "namespace": "rl"}},
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "smoke-secret", "namespace": "rl",
                                                            "labels": LABELS}},
    ]
    cluster.add({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "default"}})
    for obj in keep:
        cluster.add(obj)
    rc, out, err = rollfleet("down")
    assert rc == 0, err
    assert "deleted RayJob rl/smoke" in out and "deleted ConfigMap rl/smoke-config" in out
    assert "RayCluster rl/smoke-abcde: goes with its owner RayJob smoke" in out
    assert "waiting up to 120s for RayJob rl/smoke, RayCluster rl/smoke-abcde, ConfigMap rl/smoke-config, " \
           "NetworkPolicy rl/smoke to be gone" in out
    deleted = sorted(p.split("?")[0] for m, p in writes(cluster) if m == "DELETE")
    assert deleted == ["/api/v1/namespaces/rl/configmaps/smoke-config",
                       "/apis/networking.k8s.io/v1/namespaces/rl/networkpolicies/smoke",
                       "/apis/ray.io/v1/namespaces/rl/rayjobs/smoke"]
    assert cluster.get("RayCluster", "smoke-abcde", "rl") is None  # the garbage collector's cascade
    for obj in keep:
        assert cluster.get(obj["kind"], obj["metadata"]["name"], obj["metadata"]["namespace"]) is not None
    assert cluster.get("Pod", "smoke-head", "rl") is not None  # pods are the operator's to delete
    rc, out, err = rollfleet("down")
    assert rc == 0 and "nothing to delete: no RayJob, RayCluster, ConfigMap, NetworkPolicy labelled app.kubernetes.io/instance=" \
                       "smoke,app.kubernetes.io/managed-by=rollfleet in namespace rl" in out


def test_down_timeout_names_what_is_left(cluster, rollfleet):
    cluster.add({"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {
        "name": "smoke", "namespace": "rl", "labels": LABELS, "finalizers": ["ray.io/rayjob-finalizer"]}})
    rc, out, err = rollfleet("down", "--timeout", "0.2")
    assert rc == 1
    assert ("error: timed out after 0.2s waiting for RayJob rl/smoke to be gone (a finalizer may hold it: is the "
            "KubeRay operator running?)") in err


def test_down_and_status_without_kuberay_crds(tmp_path, capsys, values_file):
    fake = seed(FakeApiServer(CORE).start())
    try:
        kubeconfig = str(fake.write_kubeconfig(tmp_path / "kc"))
        rc = cli.main(["down", "-f", values_file(), "--kubeconfig", kubeconfig])
        assert rc == 0 and "nothing to delete" in capsys.readouterr().out
        rc = cli.main(["status", "-f", values_file(), "--kubeconfig", kubeconfig])
        assert rc == 2
        assert (f"error: {fake.url} (context fake-apiserver) does not serve RayJob (ray.io/v1); install the KubeRay "
                f"operator v1.7.0 with its CRDs") in capsys.readouterr().err
    finally:
        fake.stop()


# ---- the example values and the CLI contract ---------------------------------------------------

def test_one_node_8gpu_example_deploys_onto_one_8_gpu_node(cluster, rollfleet):
    from rollfleet.golden import EXAMPLES

    cluster.on_write = kuberay_stand_in()
    rc, out, err = rollfleet("deploy", "--wait", "none", values=str(EXAMPLES / "one-node-8gpu.yaml"))
    assert rc == 0, err
    assert "RayJob rl/grpo-8gpu: created" in out and out.count(" ok") == 2


def test_pod_problems_are_pure():
    spec = load_values(None, ["name=smoke"])
    pod = ready_pod("p", "inference", ready=False, containerStatuses=[
        {"name": "ray-worker", "state": {"waiting": {"reason": "CrashLoopBackOff"}}}])
    assert kube.pod_problems(spec, [pod], []) == [
        "pod p (pools.inference): container ray-worker CrashLoopBackOff; see `rollfleet logs --component ...`"]
    event = {"reason": "FailedToCreateRayCluster", "message": "admission webhook denied",
             "involvedObject": {"kind": "RayJob", "name": "smoke"}}
    assert kube.pod_problems(spec, [], [event]) == [
        "RayJob default/smoke: FailedToCreateRayCluster: admission webhook denied"]


def test_the_kubernetes_client_is_not_imported_to_build_the_parser():
    code = "import sys, rollfleet.cli as c; c.build_parser(); sys.exit('kubernetes' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
