"""deploy/commands.py: deploy (apply, dry run, replace), diff, status, logs, down and their flags, against the
FAKE API server stand-in; conflict handling also against a small fake client that answers 409."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

import pytest
import yaml
from kubernetes.client.rest import ApiException
from kubernetes.dynamic.exceptions import api_exception

from conftest import EXAMPLES
from fake_apiserver import CORE, FakeApiServer
from rollfleet import cli
from rollfleet.deploy import commands
from rollfleet.values import load_values

from .conftest import LABELS, kuberay_stand_in, ready_pod, seed, writes


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
    patches = [p for m, p in writes(cluster) if m == "PATCH"]
    assert all("fieldManager=rollfleet" in p and "fieldValidation=Strict" in p and "force" not in p for p in patches)

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


class AnsweringKube:
    """A small fake client: the dry run of `kind` answers `status` with `message`; records real applies."""

    def __init__(self, kind: str, status: int, message: str):
        self.kind, self.status, self.message, self.applied = kind, status, message, []

    def get(self, kind, name, namespace=None):
        return None

    def apply(self, obj, force, dry_run=False):
        if obj["kind"] == self.kind and not force:
            raise self._error()
        if not dry_run:
            self.applied.append(obj["kind"])
        return {**obj, "metadata": {**obj["metadata"], "resourceVersion": "1"}}

    def _error(self):
        exc = ApiException(status=self.status, reason="Conflict")
        exc.body = json.dumps({"kind": "Status", "message": self.message, "code": self.status})
        return api_exception(exc)


OBJECTS = [{"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "rl"}},
           {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "j", "namespace": "rl"}}]


def test_a_409_in_the_dry_run_applies_nothing_and_says_how_to_take_over():
    kube = AnsweringKube("RayJob", 409, 'Apply failed with 1 conflict: conflict with "helm": .spec.entrypoint')
    changes, problems = commands.dry_run(kube, OBJECTS, force=False)
    assert problems == ['RayJob rl/j: Apply failed with 1 conflict: conflict with "helm": .spec.entrypoint; another '
                        'field manager (a kubectl edit, another tool) owns these fields: change them back, or rerun '
                        'with --force-conflicts to take them over']
    assert kube.applied == []
    changes, problems = commands.dry_run(kube, OBJECTS, force=True)
    assert problems == [] and [c.outcome for c in changes] == ["created", "created"]
    lines, problems = commands.apply_objects(kube, changes, force=True)
    assert (lines, problems) == (["ConfigMap rl/c: created", "RayJob rl/j: created"], [])


def test_an_unknown_field_names_the_crd_version():
    kube = AnsweringKube("RayJob", 400, 'RayJob in version "v1" cannot be handled as a RayJob: strict decoding '
                                        'error: unknown field "spec.rayClusterSpec.workerGroupSpecs[0].priority"')
    _, problems = commands.dry_run(kube, OBJECTS, force=False)
    assert problems[0].startswith('RayJob rl/j rejected by the API server: RayJob in version "v1" cannot be handled')
    assert problems[0].endswith("the cluster's KubeRay CRDs are likely older than v1.7.0 (kubectl get crd "
                                "rayjobs.ray.io): upgrade them")


def test_an_object_the_api_server_rejects_writes_nothing(cluster, rollfleet):
    cluster.admission = lambda obj: ("spec.rayClusterSpec.headGroupSpec: Forbidden: a stand-in webhook says no"
                                     if obj["kind"] == "RayJob" else None)
    rc, out, err = rollfleet("deploy")
    assert rc == 2
    assert ('error: RayJob rl/smoke rejected by the API server: RayJob "smoke" is invalid: '
            'spec.rayClusterSpec.headGroupSpec: Forbidden') in err
    assert writes(cluster) == [] and cluster.get("ConfigMap", "smoke-config", "rl") is None


# ---- --dry-run, diff, --replace -----------------------------------------------------------------

def test_dry_run_prints_what_would_change_and_writes_nothing(cluster, rollfleet, values_file):
    rc, out, err = rollfleet("deploy", "--dry-run")
    assert rc == 0, err
    assert "ConfigMap rl/smoke-config: would be created (server dry run)" in out
    assert "RayJob rl/smoke: would be created (server dry run)" in out and out.endswith("dry run: nothing written\n")
    assert writes(cluster) == []
    cluster.on_write = kuberay_stand_in()
    assert rollfleet("deploy")[0] == 0
    before = len(writes(cluster))
    rc, out, err = rollfleet("deploy", "--dry-run", values=values_file(job={"steps": 7}))
    assert rc == 0, err
    assert "ConfigMap rl/smoke-config: would be configured (server dry run)" in out
    assert "RayJob rl/smoke: would be unchanged (server dry run)" in out
    assert "--- live/ConfigMap/rl/smoke-config\n+++ after-apply/ConfigMap/rl/smoke-config\n" in out
    assert '-        "steps": 3,\n+        "steps": 7,\n' in out
    assert len(writes(cluster)) == before


def test_dry_run_still_runs_preflight(fake, rollfleet):
    seed(fake, secret_keys=None)
    rc, out, err = rollfleet("deploy", "--dry-run")
    assert rc == 2 and "Secret rl/hf-token (model.hfTokenSecret.name) does not exist" in err


def test_diff(cluster, rollfleet, values_file):
    rc, out, err = rollfleet("diff")
    assert rc == 1, err
    assert "--- live/RayJob/rl/smoke\n+++ after-apply/RayJob/rl/smoke\n" in out and "+kind: RayJob\n" in out
    assert "+  backoffLimit: 0\n" in out  # what the server adds (a CRD default outside any list) shows too
    assert not [line for line in out.splitlines() if line.startswith("-") and not line.startswith("--- ")]
    cluster.on_write = kuberay_stand_in()
    assert rollfleet("deploy")[0] == 0
    rc, out, err = rollfleet("diff")
    assert rc == 0 and out == ("no changes: ConfigMap rl/smoke-config, RayJob rl/smoke, NetworkPolicy rl/smoke as the "
                               "values render them\n")
    rc, out, err = rollfleet("diff", values=values_file(pools={"inference": {"nodes": 2, "gpusPerNode": 2}}))
    assert rc == 1 and "-      replicas: 1\n" in out and "+      replicas: 2\n" in out
    assert writes(cluster)[-1][0] == "PATCH" and len(writes(cluster)) == 3  # only the deploy wrote (3 objects)


def test_diff_names_a_missing_namespace(fake, rollfleet):
    seed(fake, namespace="other")
    rc, out, err = rollfleet("diff")
    assert rc == 2
    assert ('error: ConfigMap rl/smoke-config: namespaces "rl" not found; create it (kubectl create namespace rl) or '
            'set `namespace:` (or -n)') in err


def test_replace_deletes_a_finished_rayjob_and_creates_it_again(cluster, rollfleet):
    cluster.on_write = kuberay_stand_in(job_status="FAILED", deployment="Failed")
    rollfleet("deploy", "--wait", "none")
    uid = cluster.get("RayJob", "smoke", "rl")["metadata"]["uid"]
    rc, out, err = rollfleet("deploy", "--replace", "--dry-run")
    assert rc == 0 and "RayJob rl/smoke: would be deleted and created again (--replace)" in out
    cluster.on_write = kuberay_stand_in()
    rc, out, err = rollfleet("deploy", "--replace")
    assert rc == 0, err
    assert "deleted RayJob rl/smoke (--replace; its RayCluster and pods go with it)" in out
    assert "waiting up to 120s for RayJob rl/smoke to be gone" in out and "RayJob rl/smoke: created" in out
    assert cluster.get("RayJob", "smoke", "rl")["metadata"]["uid"] != uid


# ---- namespaces ---------------------------------------------------------------------------------

def test_namespace_flag_places_values_that_leave_namespace_at_default(fake, rollfleet, values_file):
    seed(fake, namespace="team")
    fake.on_write = kuberay_stand_in()
    rc, out, err = rollfleet("deploy", "-n", "team", values=values_file(namespace="default"))
    assert rc == 0, err
    assert "namespace team" in out and "RayJob team/smoke: created" in out
    assert '"namespace": "team"' in fake.get("ConfigMap", "smoke-config", "team")["data"]["fleet.json"]
    rc, out, err = rollfleet("deploy", "-n", "team")  # the values say rl
    assert rc == 2
    assert err == "error: --namespace team: the values say namespace 'rl'; drop -n or make them agree\n"


def test_the_context_namespace_is_the_default(fake, tmp_path, capsys, values_file):
    seed(fake, namespace="ctx-ns")
    path = fake.write_kubeconfig(tmp_path / "kc")
    config = yaml.safe_load(path.read_text())
    config["contexts"][0]["context"]["namespace"] = "ctx-ns"
    path.write_text(yaml.safe_dump(config))
    rc = cli.main(["deploy", "-f", values_file(namespace="default"), "--kubeconfig", str(path), "--wait", "none"])
    out = capsys.readouterr().out
    assert rc == 0 and "RayJob ctx-ns/smoke: created" in out
    rc = cli.main(["status", "smoke", "--kubeconfig", str(path)])
    assert "RayJob ctx-ns/smoke: present" in capsys.readouterr().out


# ---- status -------------------------------------------------------------------------------------

def test_status(cluster, rollfleet):
    rc, out, err = rollfleet("status")
    assert rc == 1 and "ConfigMap rl/smoke-config: absent" in out and "RayJob rl/smoke: not found" in out
    cluster.on_write = kuberay_stand_in()
    rollfleet("deploy")
    rc, out, err = rollfleet("status")
    assert rc == 0
    assert "RayJob rl/smoke: present (resourceVersion" in out and "deployment Running, job RUNNING" in out


def test_status_needs_the_fleet_named(cluster, rollfleet):
    rc, out, err = rollfleet("status", values=None)
    assert rc == 2
    assert err == ("error: status: name the fleet: `rollfleet status NAME [-n NAMESPACE]`, or `rollfleet status -f "
                   "values.yaml`\n")
    rc, out, err = rollfleet("down", "smoke")
    assert rc == 2 and err == "error: down: give the fleet's NAME or a values file (-f/--set), not both\n"
    rc, out, err = rollfleet("status", "smoke", "--set-string", "name=other", values=None)
    assert rc == 2 and err == "error: status: give the fleet's NAME or a values file (-f/--set), not both\n"


def test_status_by_name_reads_the_fleet_from_the_cluster(cluster, rollfleet, values_file):
    cluster.on_write = kuberay_stand_in()
    rollfleet("deploy", values=values_file(pools={"inference": {"nodes": 2, "gpusPerNode": 2}}))
    rc, out, err = rollfleet("status", "smoke", "-n", "rl", values=None)
    assert rc == 0, err
    assert "ConfigMap rl/smoke-config: present" in out and "pods ready: head 1/1, trainer 1/1, inference 1/2" in out
    rc, out, err = rollfleet("status", "other", "-n", "rl", values=None)
    assert rc == 1
    assert err.startswith(f"error: no RayJob or RayCluster 'other' in namespace rl on {cluster.url} (context "
                          f"fake-apiserver); fleets there: smoke")


@pytest.mark.parametrize("output", ["json", "yaml"])
def test_status_as_a_document(cluster, rollfleet, output):
    cluster.on_write = kuberay_stand_in()
    rollfleet("deploy")
    rc, out, err = rollfleet("status", "-o", output)
    assert rc == 0, err
    doc = json.loads(out) if output == "json" else yaml.safe_load(out)
    assert doc["name"] == "smoke" and doc["namespace"] == "rl" and doc["kind"] == "RayJob" and doc["ready"] is True
    assert doc["state"] == {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING", "rayClusterName": "smoke-abcde",
                            "rayClusterState": "ready"}
    assert doc["pods"]["inference"] == {"ready": 1, "want": 1} and doc["problems"] == [] and doc["failure"] is None
    assert [o["kind"] for o in doc["objects"] if o["present"]] == ["ConfigMap", "RayJob"]


def test_status_wait_as_a_document_keeps_stdout_one_document(cluster, rollfleet):
    cluster.on_write = kuberay_stand_in(job_status="SUCCEEDED", deployment="Complete")
    rollfleet("deploy", "--wait", "none")
    rc, out, err = rollfleet("status", "--wait", "complete", "-o", "json")
    assert rc == 0 and json.loads(out)["state"]["jobDeploymentStatus"] == "Complete"
    assert "waiting up to 1s for RayJob rl/smoke to succeed" in err


def test_status_of_a_fleet_helm_installed(cluster, rollfleet):
    cluster.add({"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {
        "name": "fleet", "namespace": "rl", "labels": {**LABELS, "app.kubernetes.io/managed-by": "Helm"},
        "annotations": {"meta.helm.sh/release-name": "fleet", "meta.helm.sh/release-namespace": "rl"}},
        "spec": {"rayClusterSpec": {"workerGroupSpecs": []}}})
    rc, out, err = rollfleet("status", "fleet", "-n", "rl", values=None)
    assert "installed by Helm release fleet (namespace rl)" in out and "RayJob rl/fleet: deployment -" in out


# ---- logs ---------------------------------------------------------------------------------------

def submitter(cluster, phase="Running"):
    cluster.add({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "smoke-x7k2p", "namespace": "rl",
                                                                   "labels": {"job-name": "smoke"}},
                 "spec": {"containers": [{"name": "ray-job-submitter"}]}, "status": {"phase": phase}})


def test_logs_prints_the_submitter_or_a_component(cluster, rollfleet):
    rc, out, err = rollfleet("logs")
    assert rc == 1 and "error: no submitter pod in namespace rl (labels job-name=smoke)" in err
    submitter(cluster)
    cluster.logs[("rl", "smoke-x7k2p", "ray-job-submitter")] = "".join(f"line {i}\n" for i in range(10)) + "step 3 ok\n"
    cluster.add(ready_pod("smoke-head-0", "head"))
    cluster.logs[("rl", "smoke-head-0", "ray-head")] = "head says hi\n"
    rc, out, err = rollfleet("logs", "--tail", "2")
    assert rc == 0
    assert out == "==> pod smoke-x7k2p, container ray-job-submitter (last 2 lines) <==\nline 9\nstep 3 ok\n"
    rc, out, err = rollfleet("logs", "--component", "head")
    assert rc == 0 and out.endswith("head says hi\n")


def test_logs_by_name_follow_until_the_pod_ends(cluster, rollfleet):
    cluster.on_write = kuberay_stand_in()
    rollfleet("deploy", "--wait", "none")
    submitter(cluster)
    key = ("rl", "smoke-x7k2p", "ray-job-submitter")
    cluster.logs[key] = "step 1\n"

    def job():
        time.sleep(0.2)
        cluster.logs[key] += "step 2\n"
        time.sleep(0.2)
        cluster.logs[key] += "done\n"
        cluster.set_status("Pod", "smoke-x7k2p", "rl", {"phase": "Succeeded"})
    threading.Thread(target=job, daemon=True).start()
    rc, out, err = rollfleet("logs", "smoke", "-n", "rl", "--follow", values=None)
    assert rc == 0, err
    assert out.endswith("(from the last 100 lines; Ctrl-C stops) <==\nstep 1\nstep 2\ndone\n")


def test_logs_follow_several_pods_prefixes_lines(cluster, rollfleet):
    for i in range(2):
        cluster.add({**ready_pod(f"smoke-inference-{i}", "inference"), "status": {"phase": "Succeeded"}})
        cluster.logs[("rl", f"smoke-inference-{i}", "ray-worker")] = f"engine {i} up\n"
    rc, out, err = rollfleet("logs", "--component", "inference", "--follow")
    assert rc == 0, err
    assert sorted(out.splitlines()[1:]) == ["[smoke-inference-0] engine 0 up", "[smoke-inference-1] engine 1 up"]


# ---- down ---------------------------------------------------------------------------------------

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
    policy = {"apiVersion": "networking.k8s.io/v1", "kind": "NetworkPolicy",
              "metadata": {"name": "smoke", "namespace": "rl", "labels": LABELS}}
    cluster.add(policy)  # a kind rollfleet renders too (where the values enable it)
    rc, out, err = rollfleet("down", "smoke", "-n", "rl", values=None)
    assert rc == 0, err
    assert "deleted RayJob rl/smoke" in out and "deleted ConfigMap rl/smoke-config" in out
    assert "deleted NetworkPolicy rl/smoke" in out
    assert "RayCluster rl/smoke-abcde: goes with its owner RayJob smoke" in out
    assert ("waiting up to 120s for RayJob rl/smoke, RayCluster rl/smoke-abcde, ConfigMap rl/smoke-config, "
            "NetworkPolicy rl/smoke to be gone") in out
    deleted = sorted(p.split("?")[0] for m, p in writes(cluster) if m == "DELETE")
    assert deleted == ["/api/v1/namespaces/rl/configmaps/smoke-config",
                       "/apis/networking.k8s.io/v1/namespaces/rl/networkpolicies/smoke",
                       "/apis/ray.io/v1/namespaces/rl/rayjobs/smoke"]
    assert cluster.get("RayCluster", "smoke-abcde", "rl") is None  # the garbage collector's cascade
    for obj in keep:
        assert cluster.get(obj["kind"], obj["metadata"]["name"], obj["metadata"]["namespace"]) is not None
    assert cluster.get("Pod", "smoke-head", "rl") is not None  # pods are the operator's to delete
    rc, out, err = rollfleet("down")
    assert rc == 0
    assert ("nothing to delete: no RayJob, RayCluster, ConfigMap, NetworkPolicy, PodMonitor, PrometheusRule labelled "
            "app.kubernetes.io/instance=smoke,app.kubernetes.io/managed-by=rollfleet in namespace rl") in out


def test_down_names_a_helm_release_it_leaves_alone(cluster, rollfleet):
    cluster.add({"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {
        "name": "fleet", "namespace": "rl", "labels": {**LABELS, "app.kubernetes.io/instance": "fleet",
                                                       "app.kubernetes.io/managed-by": "Helm"},
        "annotations": {"meta.helm.sh/release-name": "fleet", "meta.helm.sh/release-namespace": "rl"}}})
    rc, out, err = rollfleet("down", "fleet", "-n", "rl", values=None)
    assert rc == 0
    assert "RayJob rl/fleet belongs to Helm release fleet: remove it with `helm uninstall fleet -n rl`" in out
    assert cluster.get("RayJob", "fleet", "rl") is not None


def test_down_timeout_names_what_is_left(cluster, rollfleet):
    cluster.add({"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {
        "name": "smoke", "namespace": "rl", "labels": LABELS, "finalizers": ["ray.io/rayjob-finalizer"]}})
    rc, out, err = rollfleet("down", "--timeout", "200ms")
    assert rc == 1
    assert ("error: timed out after 0.2s waiting for RayJob rl/smoke to be gone (a finalizer may hold it: is the "
            "KubeRay operator running?") in err


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


@pytest.mark.parametrize("text, seconds", [("90", 90), ("90s", 90), ("5m", 300), ("1h30m", 5400), ("1.5h", 5400),
                                           ("250ms", 0.25)])
def test_durations(text, seconds):
    assert commands.duration(text) == seconds


@pytest.mark.parametrize("text", ["5 minutes", "m", "5mm", "-1", "1d", "0", "0s", "inf", "nan"])
def test_bad_durations_are_usage_errors(text, capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["down", "smoke", "--timeout", text])
    assert exit_.value.code == 2 and "duration" in capsys.readouterr().err


def test_a_request_rbac_refuses_says_so(cluster, rollfleet):
    cluster.forbidden.add(("list", "pods"))
    rc, out, err = rollfleet("status")
    assert rc == 1
    assert err.startswith("error: the API server answered 403: pods is forbidden")
    assert err.endswith("; your user may not do this: ask a cluster admin for the permission, or pick another "
                        "--context\n")


def test_interrupts_exit_130_without_a_traceback(cluster, rollfleet, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt
    monkeypatch.setattr(commands, "preflight", interrupted)
    rc, out, err = rollfleet("deploy")
    assert rc == 130 and err == "error: interrupted\n"


def test_the_kubernetes_client_is_not_imported_to_build_the_parser():
    code = "import sys, rollfleet.cli as c; c.build_parser(); sys.exit('kubernetes' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.stem)
def test_a_namespace_from_the_command_line_changes_nothing_else(example):
    spec = load_values(example)
    moved = commands.in_namespace(spec, "elsewhere")
    assert moved.namespace == "elsewhere" and moved.model_copy(update={"namespace": spec.namespace}) == spec
