"""validate.py: the KubeRay CRDs made strict, and kubernetes-validate strict for built-in kinds."""

from __future__ import annotations

import copy

import jsonschema
import pytest

from conftest import EXAMPLES, ROOT
from rollfleet.render import render_objects
from rollfleet.values import load_values
from rollfleet.spec import load_spec
from rollfleet.validate import crd_validator, crds_dir, make_strict, validate_object, validate_objects


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.stem)
def test_every_example_validates_strictly(crds, example):
    objs = render_objects(load_values(example))
    assert {o["kind"] for o in objs} <= {"ConfigMap", "RayJob", "RayCluster", "NetworkPolicy", "PodMonitor",
                                         "PrometheusRule"}
    assert validate_objects(objs, crds) == []


@pytest.mark.parametrize("values", [
    pytest.param({}, id="defaults"),
    pytest.param({"job": {"enabled": False}}, id="raycluster"),
    pytest.param({"job": {"submissionMode": "HTTPMode", "activeDeadlineSeconds": 60,
                          "shutdownAfterJobFinishes": False}}, id="job-options"),
    pytest.param({"image": {"digest": "sha256:" + "f" * 64, "pullSecrets": ["a"]},
                  "head": {"nodeSelector": {"n": "x"}, "tolerations": [{"key": "k", "effect": "NoSchedule"}]},
                  "pools": {"trainer": {"rdma": {"enabled": True}, "labels": {"a": "b"}, "annotations": {"c": "d"},
                                        "tolerations": [{"key": "t", "operator": "Equal", "value": "v"}]}},
                  "model": {"hfTokenSecret": {"name": "hf"}}}, id="every-optional-block"),
])
def test_spec_variants_validate_strictly(crds, values):
    assert validate_objects(render_objects(load_spec(values)), crds) == []


def _job(crds_path):
    objs = render_objects(load_spec({"name": "broken"}))
    job = copy.deepcopy(objs[1])
    assert validate_object(job, crds_path) == []
    return job


def test_unknown_field_in_a_worker_group_is_reported_with_its_path(crds):
    job = _job(crds)
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]["replica"] = 2
    (problem,) = validate_object(job, crds)
    assert problem.startswith("RayJob/broken: spec.rayClusterSpec.workerGroupSpecs.1: ")
    assert "'replica' was unexpected" in problem


def test_unknown_field_deep_in_a_pod_template_is_reported(crds):
    job = _job(crds)
    container = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    container["resource"] = {}
    (problem,) = validate_object(job, crds)
    assert "spec.rayClusterSpec.workerGroupSpecs.0.template.spec.containers.0" in problem
    assert "'resource'" in problem


def test_wrong_type_is_reported_with_its_path(crds):
    job = _job(crds)
    job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "two"
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-gpus"] = 0  # must be a string
    problems = validate_object(job, crds)
    assert any(p.startswith("RayJob/broken: spec.rayClusterSpec.workerGroupSpecs.0.replicas: ") and "'two'" in p
               for p in problems), problems
    assert any("spec.rayClusterSpec.headGroupSpec.rayStartParams.num-gpus: " in p for p in problems), problems
    assert len(problems) == 2


def test_wrong_api_version_is_reported():
    job = render_objects(load_spec({"name": "v"}))[1]
    job["apiVersion"] = "ray.io/v1alpha1"
    assert validate_object(job) == ["RayJob/v: apiVersion 'ray.io/v1alpha1' is not ray.io/v1"]


def test_broken_raycluster_is_reported(crds):
    cluster = render_objects(load_spec({"name": "c", "job": {"enabled": False}}))[1]
    cluster["spec"]["upgradeStrategy"] = {"type": "Sometimes"}
    (problem,) = validate_object(cluster, crds)
    assert problem.startswith("RayCluster/c: spec.upgradeStrategy.type: ")


def test_configmap_is_checked_by_kubernetes_strict():
    cm = render_objects(load_spec({"name": "cm"}))[0]
    assert validate_object(cm) == []
    unknown = copy.deepcopy(cm)
    unknown["spec"] = {}
    (problem,) = validate_object(unknown)
    assert problem.startswith("ConfigMap/cm-config: (root): ") and "spec" in problem
    wrong = copy.deepcopy(cm)
    wrong["data"]["fleet.json"] = 42
    (problem,) = validate_object(wrong)
    assert problem.startswith("ConfigMap/cm-config: data.fleet.json: ")


def test_metadata_is_left_to_the_api_server(crds):
    job = _job(crds)
    job["metadata"]["annotations"] = {"a": "b"}
    job["metadata"]["finalizers"] = ["x"]
    assert validate_object(job, crds) == []


def test_make_strict_closes_objects_with_properties():
    schema = {"type": "object", "properties": {"a": {"type": "object", "properties": {"b": {"type": "string"}}},
                                               "items": {"type": "array", "items": {
                                                   "type": "object", "properties": {"c": {"type": "integer"}}}}}}
    strict = make_strict(schema)
    assert strict["additionalProperties"] is False
    assert strict["properties"]["a"]["additionalProperties"] is False
    assert strict["properties"]["items"]["items"]["additionalProperties"] is False
    assert "additionalProperties" not in schema  # the input is not modified
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"a": {"b": "x", "typo": 1}}, strict)


def test_make_strict_leaves_preserve_unknown_fields_open():
    schema = {"type": "object", "properties": {
        "open": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"k": {}}},
        "map": {"type": "object", "additionalProperties": {"type": "string"}, "properties": {"k": {}}},
    }}
    strict = make_strict(schema)
    assert "additionalProperties" not in strict["properties"]["open"]
    assert strict["properties"]["map"]["additionalProperties"] == {"type": "string"}
    jsonschema.validate({"open": {"k": 1, "anything": {"goes": True}}, "map": {"x": "y"}}, strict)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"map": {"x": 1}}, strict)


def test_crd_validator_is_strict_at_the_top(crds):
    validator = crd_validator("RayJob", str(crds))
    assert validator.schema["additionalProperties"] is False
    assert validator.schema["properties"]["spec"]["additionalProperties"] is False


def test_crds_dir_honours_the_environment(crds, monkeypatch, tmp_path):
    monkeypatch.setenv("ROLLFLEET_CRDS_DIR", str(crds))
    assert crds_dir() == crds
    monkeypatch.setenv("ROLLFLEET_CRDS_DIR", str(tmp_path))  # empty: not taken, the next candidate is
    assert crds_dir() != tmp_path


def test_strict_schema_is_cached_as_json_keyed_by_the_file(crds, monkeypatch, tmp_path):
    from rollfleet.validate import CRD_FILES, cached_strict_schema, strict_schema

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    path = crds / CRD_FILES["RayJob"]
    first = cached_strict_schema(path)
    (cached,) = (tmp_path / "rollfleet" / "crd-schemas").iterdir()
    assert first == strict_schema(path.read_bytes()) and first["additionalProperties"] is False
    cached.write_text('{"marker": true}')  # the cache is what a second run reads
    assert cached_strict_schema(path) == {"marker": True}
    cached.write_text("not json")  # a broken cache is rebuilt
    assert cached_strict_schema(path) == first


def test_missing_crds_say_how_to_get_them_outside_a_checkout(monkeypatch, tmp_path):
    from rollfleet import validate

    monkeypatch.setenv("ROLLFLEET_CRDS_DIR", str(tmp_path))
    monkeypatch.setattr(validate, "__file__", str(tmp_path / "site-packages/rollfleet/validate.py"))
    with pytest.raises(validate.CrdsMissing) as exc:
        validate.crds_dir()
    message = str(exc.value)
    assert "--crds DIR" in message and "curl -fsSLO" in message
    assert "ray.io_rayjobs.yaml" in message and "v1.7.0" in message


MONITORED = {"monitoring": {"podMonitor": {"enabled": True, "labels": {"release": "kps"}, "intervalSeconds": 15},
                            "scraper": {"namespace": "monitoring", "podLabels": {"app": "prometheus"}},
                            "alerts": {"enabled": True}, "dashboard": {"enabled": True}}}


@pytest.mark.parametrize("staleness", [0, 3])
def test_the_monitoring_objects_validate_against_the_prometheus_operators_crds(crds, staleness):
    objs = render_objects(load_spec({**MONITORED, "rollout": {"maxStaleness": staleness}}))
    assert [o["kind"] for o in objs[-3:]] == ["PodMonitor", "PrometheusRule", "ConfigMap"]
    assert validate_objects(objs, crds) == []
    alerts = [r["alert"] for r in objs[-2]["spec"]["groups"][0]["rules"]]
    assert ("RollfleetStalenessAtBound" in alerts) == (staleness > 0)  # on-policy: every sample is at the bound


@pytest.mark.parametrize("kind, path, value, expect", [
    ("PodMonitor", ("spec", "podMetricsEndpoints", 0, "interval"), "30 sec", "interval: '30 sec' does not match"),
    ("PodMonitor", ("spec", "selectors"), {}, "'selectors' was unexpected"),
    ("PrometheusRule", ("spec", "groups", 0, "rules", 0, "for"), "1 minute", "for: '1 minute' does not match"),
])
def test_a_broken_monitoring_object_is_reported_with_its_path(crds, kind, path, value, expect):
    obj = next(o for o in render_objects(load_spec(MONITORED)) if o["kind"] == kind)
    node = obj
    for part in path[:-1]:
        node = node[part]
    node[path[-1]] = value
    (problem,) = validate_object(obj, crds)
    assert problem.startswith(f"{kind}/rollfleet: ") and expect in problem, problem


def test_the_monitoring_crds_are_the_makefiles_pin():
    from rollfleet.spec import PROMETHEUS_OPERATOR_VERSION

    assert f"PROMETHEUS_OPERATOR_VERSION := {PROMETHEUS_OPERATOR_VERSION}\n" in (ROOT / "Makefile").read_text()


def test_missing_monitoring_crds_say_how_to_get_them(monkeypatch, tmp_path):
    from rollfleet import validate

    monkeypatch.setenv("ROLLFLEET_MONITORING_CRDS_DIR", str(tmp_path))
    monkeypatch.setattr(validate, "__file__", str(tmp_path / "site-packages/rollfleet/validate.py"))
    with pytest.raises(validate.CrdsMissing) as exc:
        validate.monitoring_crds_dir()
    assert "make monitoring-crds" in str(exc.value) and "proxy.golang.org" in str(exc.value)
