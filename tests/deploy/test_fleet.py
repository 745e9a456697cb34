"""deploy/fleet.py: what the objects say, whether `rollfleet render` or the Helm chart made them."""

from __future__ import annotations

from rollfleet.deploy import fleet as f
from rollfleet.render import render_objects
from rollfleet.spec import load_spec

from .conftest import LABELS, kuberay_stand_in


def rendered(**values):
    return render_objects(load_spec({"name": "smoke", "namespace": "rl", **values}))


def test_secret_refs_come_from_the_pod_templates_once_each():
    objects = rendered(model={"hfTokenSecret": {"name": "hf", "key": "tok"}}, image={"pullSecrets": ["a", "b"]},
                       secretEnv={"WANDB_API_KEY": {"name": "wandb", "key": "key"}})
    assert f.secret_refs(objects) == [
        f.SecretRef("a", None, "image.pullSecrets[0]"), f.SecretRef("b", None, "image.pullSecrets[1]"),
        f.SecretRef("hf", "tok", "model.hfTokenSecret.name", "model.hfTokenSecret.key"),
        f.SecretRef("wandb", "key", "secretEnv.WANDB_API_KEY.name", "secretEnv.WANDB_API_KEY.key")]


def test_the_ray_auth_secret_is_a_ref_with_kuberays_key():
    assert f.secret_refs(rendered(rayAuth={"secretName": "ray-tok"})) == [
        f.SecretRef("ray-tok", "auth_token", "rayAuth.secretName")]
    assert f.secret_refs(rendered()) == []  # KubeRay generates the token


def test_groups_count_hosts_and_every_containers_gpus():
    _, top, *_ = rendered(pools={"trainer": {"nodes": 2, "gpusPerNode": 4}})
    trainer = top["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]
    trainer["numOfHosts"] = 2
    trainer["template"]["spec"]["containers"].append({"name": "sidecar", "resources": {"requests": {f.GPU: "1"}}})
    group = f.groups_of(top)[0]
    assert (group.pods, group.gpus, group.component) == (4, 5, "trainer")


def test_the_rendered_fleet():
    fleet = f.rendered_fleet(rendered(job={"enabled": False}, timeouts={"initSeconds": 90}))
    assert (fleet.kind, fleet.top, fleet.config, fleet.init_seconds) == ("RayCluster", "RayCluster rl/smoke",
                                                                        "smoke-config", 90.0)
    assert fleet.selector == "app.kubernetes.io/name=rollfleet,app.kubernetes.io/instance=smoke"


def test_helm_release_from_labels_or_annotations():
    assert f.helm_release({"metadata": {"labels": LABELS}}) is None
    helm = {"metadata": {"namespace": "rl", "labels": {**LABELS, "app.kubernetes.io/managed-by": "Helm"}}}
    assert f.helm_release(helm) == ("smoke", "rl")
    annotated = {"metadata": {"annotations": {f.HELM_RELEASE: "rel", f.HELM_NAMESPACE: "team"}}}
    assert f.helm_release(annotated) == ("rel", "team")


def test_the_live_fleet_is_read_from_the_cluster(cluster, rollfleet, kubeconfig):
    from rollfleet.deploy.client import connect

    cluster.on_write = kuberay_stand_in()
    rollfleet("deploy", "--wait", "none")
    kube = connect(kubeconfig, None)
    fleet = f.live_fleet(kube, "smoke", "rl")
    assert (fleet.kind, fleet.submission_mode, fleet.init_seconds) == ("RayJob", "K8sJobMode", 1.0)
    assert fleet.want == {"head": 1, "trainer": 1, "inference": 1}
    assert f.live_fleet(kube, "nope", "rl") is None
