"""The FAKE API server stand-in itself: the Kubernetes semantics tests/test_kube.py relies on.

These pin the stand-in's behaviour to what kube-apiserver documents for server-side apply, selectors and
the status subresource, so a passing test_kube.py means something. It is still not Kubernetes.
"""

from __future__ import annotations

import pytest

from fake_apiserver import ApiError, FakeApiServer, match_fields, match_labels


def configmap(data: dict, **labels) -> dict:
    return {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c", "namespace": "ns", "labels": labels},
            "data": data}


def rayjob(spec: dict, status: dict | None = None) -> dict:
    return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": {"name": "j", "namespace": "ns"}, "spec": spec,
            **({"status": status} if status else {})}


@pytest.fixture
def fake(crds):
    server = FakeApiServer(crds=crds)
    server.add({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "ns"}})
    return server


def test_apply_removes_fields_the_manager_stopped_applying(fake):
    fake.apply(configmap({"a": "1", "b": "2"}), "m")
    assert fake.apply(configmap({"a": "1"}), "m")["data"] == {"a": "1"}


def test_a_field_applied_with_the_same_value_is_shared_not_a_conflict(fake):
    fake.apply(configmap({"a": "1", "b": "2"}), "m")
    fake.apply(configmap({"a": "1"}), "other")  # same value: no conflict, now co-owned
    assert fake.apply(configmap({"b": "2"}), "m")["data"] == {"a": "1", "b": "2"}  # "other" still owns a
    with pytest.raises(ApiError) as exc:
        fake.apply(configmap({"a": "9"}), "m")
    assert exc.value.code == 409 and exc.value.reason == "Conflict"
    assert exc.value.message == 'Apply failed with 1 conflict: conflict with "other": .data.a'


def test_force_takes_the_field_over(fake):
    fake.apply(configmap({"a": "1"}), "other")
    obj = fake.apply(configmap({"a": "2"}), "m", force=True)
    managers = {m["manager"]: m["fieldsV1"] for m in obj["metadata"]["managedFields"]}
    assert obj["data"] == {"a": "2"} and "f:data" not in managers.get("other", {})


def test_no_op_apply_and_dry_run_write_nothing(fake):
    first = fake.apply(configmap({"a": "1"}), "m")
    assert fake.apply(configmap({"a": "1"}), "m")["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
    dry = fake.apply(configmap({"a": "2"}), "m", dry_run=True)
    assert dry["data"] == {"a": "2"} and fake.get("ConfigMap", "c", "ns")["data"] == {"a": "1"}


def test_status_subresource(fake):
    created = fake.apply(rayjob({"entrypoint": "x"}, status={"jobStatus": "FAKE"}), "m")
    assert "status" not in created and created["metadata"]["generation"] == 1  # an apply never writes status
    after = fake.set_status("RayJob", "j", "ns", {"jobStatus": "RUNNING"})
    assert after["status"] == {"jobStatus": "RUNNING"} and after["metadata"]["generation"] == 1
    changed = fake.apply(rayjob({"entrypoint": "y"}), "m")
    assert changed["metadata"]["generation"] == 2 and changed["status"]["jobStatus"] == "RUNNING"


def raycluster(**group) -> dict:
    return {"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {"name": "r", "namespace": "ns"},
            "spec": {"headGroupSpec": {"rayStartParams": {}, "template": {"spec": {"containers": []}}},
                     "workerGroupSpecs": [{"groupName": "g", "rayStartParams": {}, "replicas": 1,
                                           "template": {"spec": {"containers": []}}, **group}]}}


def test_crd_defaults_are_stored_and_returned(fake):
    stored = fake.apply(raycluster(), "m")
    group = stored["spec"]["workerGroupSpecs"][0]
    assert (group["priority"], group["numOfHosts"], group["minReplicas"], group["maxReplicas"]) == (0, 1, 0, 2147483647)
    assert fake.get("RayCluster", "r", "ns") == stored
    assert fake.apply(rayjob({"entrypoint": "x"}), "m")["spec"]["submissionMode"] == "K8sJobMode"


def test_an_apply_that_leaves_a_list_default_to_the_server_is_never_a_no_op(fake):
    """What kube-apiserver showed (DESIGN §11): the list is applied whole, the merge lacks the default,
    so the no-op check fails and the object is written again, every time."""
    versions = [fake.apply(raycluster(), "m")["metadata"]["resourceVersion"] for _ in range(3)]
    assert len(set(versions)) == 3
    spelled_out = {"priority": 0, "numOfHosts": 1, "minReplicas": 0, "maxReplicas": 2147483647}
    versions = [fake.apply(raycluster(**spelled_out), "m")["metadata"]["resourceVersion"] for _ in range(3)]
    assert len(set(versions)) == 1  # the stored object already holds these values: every apply is a no-op


def test_unknown_fields_are_pruned_with_a_warning_or_refused_when_strict(fake):
    typo = {**raycluster(), "spec": {**raycluster()["spec"], "enableInTreeAutoscalng": True}}
    assert "enableInTreeAutoscalng" not in fake.apply(typo, "m")["spec"]
    with pytest.raises(ApiError) as exc:
        fake.apply(typo, "m", validation="Strict")
    assert exc.value.code == 400
    assert 'strict decoding error: unknown field "spec.enableInTreeAutoscalng"' in exc.value.message


def test_errors_are_worded_like_the_api_server(fake):
    code, _, body = fake.handle("GET", "/apis/ray.io/v1/namespaces/ns/rayjobs/nope", {}, b"")
    assert code == 404 and b'"message": "rayjobs.ray.io \\"nope\\" not found"' in body
    with pytest.raises(ApiError) as exc:
        fake.apply({**configmap({}), "metadata": {"name": "c", "namespace": "missing"}}, "m")
    assert exc.value.code == 404 and exc.value.message == 'namespaces "missing" not found'
    fake.admission = lambda obj: "data.a: Invalid value"
    with pytest.raises(ApiError) as exc:
        fake.apply(configmap({"a": "1"}), "m")
    assert exc.value.code == 422 and fake.get("ConfigMap", "c", "ns") is None


def test_selectors():
    labels = {"app": "x", "tier": "web"}
    assert match_labels("app=x,tier", labels) and match_labels("app!=y,!gone", labels)
    assert not match_labels("app=y", labels) and not match_labels("!tier", labels)
    pod = {"status": {"phase": "Running"}, "spec": {"nodeName": "n1"}}
    assert match_fields("status.phase!=Succeeded,status.phase!=Failed", pod)
    assert match_fields("spec.nodeName=n1", pod) and not match_fields("status.phase=Pending", pod)


def test_delete_honours_finalizers_and_cascades(fake):
    owner = fake.apply(rayjob({"entrypoint": "x"}), "m")
    fake.add({"apiVersion": "ray.io/v1", "kind": "RayCluster", "metadata": {
        "name": "j-abc", "namespace": "ns", "ownerReferences": [{"uid": owner["metadata"]["uid"], "kind": "RayJob"}]}})
    fake.handle("DELETE", "/apis/ray.io/v1/namespaces/ns/rayjobs/j", {}, b"")
    assert fake.get("RayJob", "j", "ns") is None and fake.get("RayCluster", "j-abc", "ns") is None
    fake.add({**configmap({}), "metadata": {"name": "held", "namespace": "ns", "finalizers": ["x/y"]}})
    fake.handle("DELETE", "/api/v1/namespaces/ns/configmaps/held", {}, b"")
    assert fake.get("ConfigMap", "held", "ns")["metadata"]["deletionTimestamp"]
