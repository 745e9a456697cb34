"""deploy/preflight.py: the GPU arithmetic (pure, on worker groups read from rendered objects) and every
check through `rollfleet deploy` against the FAKE API server stand-in."""

from __future__ import annotations

import re

import pytest

from fake_apiserver import CORE, FakeApiServer, kuberay
from rollfleet import cli
from rollfleet.deploy import preflight as pf
from rollfleet.deploy.fleet import groups_of
from rollfleet.render import render_objects
from rollfleet.spec import load_spec

from .conftest import (GPU, H100, KUSTOMIZE_OPERATOR_LABELS, gpu_node, kuberay_stand_in, operator_deployment,
                       ready_pod, seed, writes)


def node(name, gpus=8, used=0, product=H100, taints=(), ready=True, cordoned=False, **labels) -> pf.NodeInfo:
    return pf.NodeInfo(name, {**({"nvidia.com/gpu.product": product} if product else {}), **labels}, gpus, used,
                       tuple(taints), ready, cordoned)


def groups(trainer=(1, 4), inference=(1, 4), trainer_pool=(), inference_pool=()):
    """The worker groups of the RayJob rendered for these pool shapes (nodes, GPUs) and extra pool keys."""
    values = {"pools": {"trainer": {"nodes": trainer[0], "gpusPerNode": trainer[1], **dict(trainer_pool)},
                        "inference": {"nodes": inference[0], "gpusPerNode": inference[1], **dict(inference_pool)}},
              "vllm": {"tensorParallelSize": 1}}
    (top,) = [o for o in render_objects(load_spec(values)) if o["kind"] == "RayJob"]
    return groups_of(top)


def by_group(fits):
    return {f.group.name: f for f in fits}


# ---- GPU arithmetic -----------------------------------------------------------------------------

def test_groups_are_read_from_the_objects():
    trainer, inference = groups(trainer=(2, 4), inference=(3, 8), inference_pool={"tolerations": [{"key": "x"}]})
    assert (trainer.name, trainer.pods, trainer.gpus, trainer.field) == ("trainer", 2, 4, "pools.trainer")
    assert inference.node_selector == {"nvidia.com/gpu.product": H100} and inference.pods == 3
    assert {"key": "x", "operator": "Exists"} in inference.tolerations
    assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in inference.tolerations


def test_gpu_plan_of_the_colocated_pool_counts_each_gpu_once():
    values = {"pools": {"colocated": {"nodes": 2, "gpusPerNode": 8}}, "vllm": {"gpuMemoryUtilization": 0.5},
              "rollout": {"maxStaleness": 0}}
    (top,) = [o for o in render_objects(load_spec(values)) if o["kind"] == "RayJob"]
    (group,) = groups_of(top)
    assert (group.name, group.pods, group.gpus, group.field) == ("colocated", 2, 8, "pools.colocated")
    fits = by_group(pf.plan_gpus([group], [node("a"), node("b")]))
    assert fits["colocated"].ok and fits["colocated"].placed == 2  # trainer ranks and engines share the 16
    (short,) = pf.plan_gpus([group], [node("a"), node("b", used=1)])
    assert not short.ok and pf.gpu_problem(short).startswith("pools.colocated: needs 2 pod(s) with 8 free")


def test_gpu_plan_both_pools_share_one_8_gpu_node():
    fits = by_group(pf.plan_gpus(groups(), [node("a")]))
    assert fits["trainer"].ok and fits["inference"].ok
    assert (fits["trainer"].need, fits["trainer"].free, fits["trainer"].placed) == (4, 8, 1)
    assert fits["trainer"].shared


def test_gpu_plan_a_pod_needs_its_gpus_on_one_node():
    # 2 nodes × 3 free = 6 GPUs in total, but a 4-GPU pod fits on neither.
    fits = by_group(pf.plan_gpus(groups(trainer=(1, 4), inference=(1, 1)), [node("a", 3), node("b", 3)]))
    assert not fits["trainer"].ok and fits["trainer"].free == 6 and fits["trainer"].placed == 0
    assert fits["inference"].ok


def test_gpu_plan_a_node_hosts_as_many_pods_as_fit():
    fits = by_group(pf.plan_gpus(groups(trainer=(2, 4), inference=(1, 1)), [node("a", 8)]))
    assert fits["trainer"].placed == 2 and fits["inference"].placed == 0
    # best fit: both trainer pods share node a, which leaves node b whole for the 8-GPU inference pod
    fits = by_group(pf.plan_gpus(groups(trainer=(2, 4), inference=(1, 8)), [node("a", 8), node("b", 8)]))
    assert fits["trainer"].ok and fits["inference"].ok


def test_gpu_plan_counts_gpus_other_pods_hold():
    fits = by_group(pf.plan_gpus(groups(), [node("a", 8, used=6)]))
    assert fits["trainer"].free == 2 and not fits["trainer"].ok and not fits["inference"].ok


def test_gpu_plan_selects_by_gpu_product_and_node_selector():
    nodes = [node("a100", product="NVIDIA-A100-SXM4-80GB"), node("h100", pool="rl"), node("h100-other", pool="web")]
    fits = by_group(pf.plan_gpus(groups(trainer_pool={"nodeSelector": {"pool": "rl"}}), nodes))
    assert fits["trainer"].group.node_selector == {"nvidia.com/gpu.product": H100, "pool": "rl"}
    assert fits["trainer"].nodes == ("h100",)
    assert fits["inference"].nodes == ("h100", "h100-other")
    fits = by_group(pf.plan_gpus(groups(inference_pool={"gpuProduct": None}), nodes))
    assert fits["inference"].nodes == ("a100", "h100", "h100-other")


def test_gpu_plan_tolerates_the_gpu_taint_and_the_pools_tolerations_only():
    gpu_taint = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
    dedicated = {"key": "dedicated", "value": "rl-train", "effect": "NoSchedule"}
    soft = {"key": "soft", "effect": "PreferNoSchedule"}
    nodes = [node("gpu", taints=[gpu_taint, soft]), node("train", taints=[dedicated])]
    tol = [{"key": "dedicated", "operator": "Equal", "value": "rl-train", "effect": "NoSchedule"}]
    fits = by_group(pf.plan_gpus(groups(trainer_pool={"tolerations": tol}), nodes))
    assert fits["trainer"].nodes == ("gpu", "train")
    assert fits["inference"].nodes == ("gpu",)


def test_gpu_plan_skips_cordoned_or_not_ready_nodes():
    fits = by_group(pf.plan_gpus(groups(), [node("a", ready=False), node("b", cordoned=True)]))
    assert fits["trainer"].nodes == () and not fits["trainer"].ok
    problem = pf.gpu_problem(fits["trainer"])
    assert ("2 nodes with the labels nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3 are excluded: not Ready (a); "
            "cordoned (b)") in problem
    assert "kubelet must report Ready" in problem and "kubectl uncordon <node>" in problem


def test_a_pool_with_no_schedulable_node_names_the_taints_that_exclude_labelled_nodes():
    dedicated = {"key": "dedicated", "value": "rl-train", "effect": "NoSchedule"}
    evict = {"key": "maintenance", "effect": "NoExecute"}
    not_ready = {"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule"}
    nodes = [node("a", taints=[dedicated]), node("b", taints=[dedicated, evict]),
             node("c", taints=[not_ready], ready=False), node("web", product=None, gpus=0)]
    fits = by_group(pf.plan_gpus(groups(), nodes))
    problem = pf.gpu_problem(fits["inference"])
    assert problem.startswith("pools.inference: needs 1 pod(s) with 4 free nvidia.com/gpu each on one node, but "
                              "only 0 fit on 0 matching nodes")
    assert ("3 nodes with the labels nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3 are excluded: taint "
            "dedicated=rl-train:NoSchedule (a, b); taint maintenance:NoExecute (b); not Ready (c); tolerate them in "
            "pools.inference.tolerations (key, operator Equal, value, effect) or remove the taint from the nodes"
            ) in problem
    assert "node.kubernetes.io/not-ready" not in problem  # the node state, said as "not Ready"
    nodes.append(node("a100", product="NVIDIA-A100-SXM4-80GB"))
    problem = pf.gpu_problem(by_group(pf.plan_gpus(groups(), nodes))["inference"])
    assert problem.endswith("; GPU nodes without these labels have: NVIDIA-A100-SXM4-80GB (1 node)")


def test_a_pool_whose_labels_no_node_has_names_the_gpu_products_nodes_have():
    nodes = [node("a", product="NVIDIA-A100-SXM4-80GB"), node("b", product="NVIDIA-A100-SXM4-80GB"),
             node("c", product="NVIDIA-L4"), node("cpu", product=None, gpus=0)]
    problem = pf.gpu_problem(by_group(pf.plan_gpus(groups(), nodes))["trainer"])
    assert ("no node has the labels nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3; GPU products the nodes have: "
            "NVIDIA-A100-SXM4-80GB (2 nodes), NVIDIA-L4 (1 node); set pools.trainer.gpuProduct to one of them (null: "
            "any GPU node) or change pools.trainer.nodeSelector") in problem


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
    assert pf.tolerates([toleration], taint) is expected


def test_gpu_table_shows_need_and_have_per_pool():
    table = pf.gpu_table(pf.plan_gpus(groups(trainer=(1, 4), inference=(2, 4)), [node("a", 8)]))
    lines = table.splitlines()
    assert lines[0].split() == ["pool", "node", "selector", "need", "matching", "nodes", "free", "GPUs", "there",
                                "pods", "that", "fit"]
    assert lines[1].split()[:2] == ["trainer", f"nvidia.com/gpu.product={H100}"]
    assert "1 pod × 4 = 4 GPU" in lines[1] and re.search(r" 1 +8 +1/1 +ok$", lines[1])
    assert "2 pods × 4 = 8 GPU" in lines[2] and re.search(r" 1 +8 +1/2 +NOT ENOUGH$", lines[2])


# ---- every check, through `rollfleet deploy` ----------------------------------------------------

@pytest.mark.parametrize("types, says", [
    (CORE, "the ray.io API group is not served: KubeRay's CRDs are not installed"),
    (CORE + kuberay("v1alpha1"), "the ray.io API group serves only v1alpha1 (an older KubeRay)"),
])
def test_missing_kuberay_crds(types, says, tmp_path, capsys, values_file):
    fake = seed(FakeApiServer(types).start())
    try:
        rc = cli.main(["deploy", "-f", values_file(), "--kubeconfig", str(fake.write_kubeconfig(tmp_path / "kc"))])
        err = capsys.readouterr().err
    finally:
        fake.stop()
    assert rc == 2
    assert ("error: KubeRay CRDs rayjobs.ray.io, rayclusters.ray.io are not served at ray.io/v1 (" + says) in err
    assert "helm install kuberay-operator kuberay/kuberay-operator --version 1.7.0" in err
    assert "error: nothing applied (1 problem)" in err
    assert writes(fake) == []


def test_one_crd_missing(tmp_path, capsys, values_file, crds):
    fake = seed(FakeApiServer(CORE + kuberay()[:1], crds=crds).start())  # rayclusters only
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


def test_monitoring_objects_need_the_prometheus_operators_crds(tmp_path, capsys, values_file, crds):
    fake = seed(FakeApiServer(CORE + kuberay(), crds=crds).start())  # no monitoring.coreos.com
    try:
        kubeconfig = str(fake.write_kubeconfig(tmp_path / "kc"))
        values = values_file(monitoring__podMonitor={"enabled": True}, monitoring__alerts={"enabled": True},
                             networkPolicy={"enabled": False})
        rc = cli.main(["deploy", "-f", values, "--kubeconfig", kubeconfig])
        err = capsys.readouterr().err
        assert rc == 2 and ("error: PodMonitor, PrometheusRule (monitoring.coreos.com/v1) not served by the cluster; "
                            "install the Prometheus Operator's CRDs") in err, err
        assert writes(fake) == []
        # the dashboard alone is a ConfigMap: nothing else needed
        rc = cli.main(["deploy", "-f", values_file(monitoring__dashboard={"enabled": True}), "--kubeconfig", kubeconfig,
                       "--wait", "none"])
        assert rc == 0, capsys.readouterr().err
    finally:
        fake.stop()


def test_no_kuberay_operator_is_refused_with_the_command_to_check(fake, rollfleet):
    seed(fake, operator=False)
    rc, out, err = rollfleet("deploy")
    assert rc == 2
    assert ("error: no KubeRay operator: no Deployment labelled app.kubernetes.io/name=kuberay-operator or "
            "app.kubernetes.io/component=kuberay-operator in any namespace, so nothing would create the Ray cluster "
            "of RayJob rl/smoke; install it: helm install kuberay-operator") in err
    assert "check: kubectl get pods -A -l app.kubernetes.io/component=kuberay-operator" in err
    assert "pass --skip-operator-check" in err and writes(fake) == []
    fake.on_write = kuberay_stand_in()
    assert rollfleet("deploy", "--skip-operator-check")[0] == 0


def test_an_operator_from_kuberays_kustomize_manifests_is_found(fake, rollfleet):
    seed(fake, operator=False)
    fake.add(operator_deployment(namespace="ray-system", labels=KUSTOMIZE_OPERATOR_LABELS))
    fake.on_write = kuberay_stand_in()
    rc, out, err = rollfleet("deploy")
    assert rc == 0, err


def test_an_operator_without_an_available_replica_is_a_warning(fake, rollfleet):
    seed(fake, operator=False)
    fake.add(operator_deployment(available=0))
    fake.on_write = kuberay_stand_in()
    rc, out, err = rollfleet("deploy")
    assert rc == 0, err
    assert ("warning: KubeRay operator Deployment kuberay-system/kuberay-operator has no available replica: "
            "RayJob rl/smoke gets no status until it runs; check: kubectl -n kuberay-system get deployment "
            "kuberay-operator") in err


def test_an_operator_rbac_hides_is_a_warning(cluster, rollfleet):
    cluster.forbidden.add(("list", "deployments"))
    cluster.on_write = kuberay_stand_in()
    rc, out, err = rollfleet("deploy")
    assert rc == 0, err
    assert 'warning: KubeRay operator not checked: deployments.apps is forbidden: User "fake-user" cannot list' in err
    assert "the wait stops early if the RayJob gets no status" in err


def test_missing_namespace(fake, rollfleet):
    seed(fake, namespace="other")
    rc, out, err = rollfleet("deploy")
    assert rc == 2
    assert ("error: namespace 'rl' does not exist; create it (kubectl create namespace rl) "
            "or set `namespace:` in the values (or -n)") in err
    assert writes(fake) == []


def test_missing_secret(fake, rollfleet):
    seed(fake, secret_keys=None)
    rc, out, err = rollfleet("deploy")
    assert rc == 2
    assert ("error: Secret rl/hf-token (model.hfTokenSecret.name) does not exist; create it: kubectl -n rl create "
            "secret generic hf-token --from-file=token=<a file holding the value>") in err
    assert writes(fake) == []


def test_secret_without_the_key_names_keys_never_values(fake, rollfleet):
    seed(fake, secret_keys=("HF_TOKEN", "other"))
    rc, out, err = rollfleet("deploy")  # the fixture asserts the value appears nowhere
    assert rc == 2
    assert ("error: Secret rl/hf-token has no key 'token' (model.hfTokenSecret.key); its keys: HF_TOKEN, other; "
            "set model.hfTokenSecret.key to one of them or add the key") in err


def test_missing_pull_secret(cluster, rollfleet, values_file):
    rc, out, err = rollfleet("deploy", values=values_file(image={"pullSecrets": ["registry-creds"]}))
    assert rc == 2
    assert "error: Secret rl/registry-creds (image.pullSecrets[0]) does not exist" in err


def test_the_ray_auth_secret_needs_kuberays_key(fake, rollfleet, values_file):
    seed(fake)
    fake.add({"apiVersion": "v1", "kind": "Secret", "type": "Opaque", "metadata": {"name": "ray-tok", "namespace": "rl"},
              "data": {"token": "eA=="}})
    rc, out, err = rollfleet("deploy", values=values_file(rayAuth={"secretName": "ray-tok"}))
    assert rc == 2
    assert ("error: Secret rl/ray-tok has no key 'auth_token' (rayAuth.secretName); its keys: token; add the key "
            "auth_token (KubeRay reads that one)") in err
    rc, out, err = rollfleet("deploy", values=values_file(rayAuth={"secretName": "missing"}))
    assert "error: Secret rl/missing (rayAuth.secretName) does not exist; create it: kubectl -n rl create secret " \
           "generic missing --from-file=auth_token=<a file holding the value>" in err
    assert writes(fake) == []


def test_not_enough_gpus_prints_the_table(fake, rollfleet, values_file):
    seed(fake, nodes=[gpu_node("gpu-a", gpus=8), gpu_node("a100", product="NVIDIA-A100-SXM4-80GB")])
    fake.add({**ready_pod("someone-else", "trainer", namespace="other", instance="other"),
              "spec": {"nodeName": "gpu-a", "containers": [{"name": "c", "resources": {"limits": {GPU: "6"}}}]}})
    rc, out, err = rollfleet("deploy")
    assert rc == 2
    table = out.split("\n", 1)[1]
    assert "pool       node selector" in table
    assert "trainer    nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3  1 pod × 1 = 1 GPU" in table
    assert re.search(r"1/1 +ok", table) and re.search(r"0/1 +NOT ENOUGH", table)
    assert ("error: pools.inference: needs 1 pod(s) with 2 free nvidia.com/gpu each on one node, but only 0 fit on "
            "1 matching node (shared with the other pool, whose pods were placed too) (2 GPUs free there); "
            "free GPUs there, add nodes, or lower pools.inference.nodes / pools.inference.gpusPerNode") in err
    assert writes(fake) == []


def test_tainted_gpu_nodes_are_named(fake, rollfleet):
    taint = {"key": "dedicated", "value": "batch", "effect": "NoSchedule"}
    seed(fake, nodes=[gpu_node("gpu-a", taints=[taint]), gpu_node("gpu-b", taints=[taint])])
    rc, out, err = rollfleet("deploy")
    assert rc == 2
    assert ("error: pools.trainer: needs 1 pod(s) with 1 free nvidia.com/gpu each on one node, but only 0 fit on 0 "
            "matching nodes (0 GPUs free there); 2 nodes with the labels nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3 "
            "are excluded: taint dedicated=batch:NoSchedule (gpu-a, gpu-b)") in err


def test_every_problem_at_once(fake, rollfleet, values_file):
    seed(fake, namespace="rl", nodes=[], secret_keys=("nope",))
    rc, out, err = rollfleet("deploy", values=values_file(image={"pullSecrets": ["regcred"]}))
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert rc == 2
    assert [e.split()[1] for e in errors] == ["Secret", "Secret", "pools.trainer:", "pools.inference:", "nothing"]
    assert errors[-1] == "error: nothing applied (4 problems)"
    assert writes(fake) == []


def test_forbidden_checks_are_warnings(cluster, rollfleet):
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


# ---- what is in the way -------------------------------------------------------------------------

HELM_LABELS = {"app.kubernetes.io/name": "rollfleet", "app.kubernetes.io/instance": "smoke",
               "app.kubernetes.io/managed-by": "Helm"}
HELM_ANNOTATIONS = {"meta.helm.sh/release-name": "smoke", "meta.helm.sh/release-namespace": "rl"}


def test_objects_of_a_helm_release_are_refused_with_what_to_run(cluster, rollfleet):
    cluster.add({"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {
        "name": "smoke", "namespace": "rl", "labels": HELM_LABELS, "annotations": HELM_ANNOTATIONS}})
    rc, out, err = rollfleet("deploy")
    assert rc == 2
    assert ("error: RayJob rl/smoke belongs to Helm release smoke (namespace rl); rollfleet does not change a Helm "
            "release's objects: change it with `helm upgrade smoke charts/rollfleet -n rl -f <values>`, remove the "
            "release first (`helm uninstall smoke -n rl`), or deploy under another `name`") in err
    assert writes(cluster) == []


def test_helm_labels_alone_are_enough(cluster, rollfleet):
    cluster.add({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
        "name": "smoke-config", "namespace": "rl", "labels": HELM_LABELS}})
    rc, out, err = rollfleet("deploy", "--force-conflicts")
    assert rc == 2 and "error: ConfigMap rl/smoke-config belongs to Helm release smoke (namespace rl)" in err


@pytest.mark.parametrize("deployment, job", [("Failed", "FAILED"), ("Complete", "SUCCEEDED")])
def test_a_rayjob_that_already_ran_offers_down_or_replace(cluster, rollfleet, deployment, job):
    cluster.on_write = kuberay_stand_in(job_status=job, deployment=deployment)
    rollfleet("deploy", "--wait", "none")
    cluster.on_write = lambda server, obj: None
    rc, out, err = rollfleet("deploy")
    assert rc == 2
    assert (f"error: RayJob rl/smoke has already run (jobDeploymentStatus {deployment}, jobStatus {job}): a RayJob "
            f"runs once, so applying it again does not rerun it; delete it first (`rollfleet down smoke -n rl`) and "
            f"deploy again, or deploy with --replace to do both") in err
