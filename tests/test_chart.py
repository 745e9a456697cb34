"""charts/rollfleet, rendered and linted by the real Helm v4 engine (helm-python-sdk; no binary, no cluster).

The core property: for the same values file, `helm install NAME charts/rollfleet -n NAMESPACE -f FILE` and
`rollfleet render -f FILE` produce equal objects when NAME and NAMESPACE are the values' `name` and
`namespace` (the chart names objects after the release and places them in its namespace unless the values
set one; the parity tests pass both explicitly). The only differences allowed are Helm's own labels and the `helm test`
hooks, listed in HELM_ONLY_LABELS and TEST_HOOKS below.
"""

from __future__ import annotations

import inspect
import io
import itertools
import json
import ssl
import sys
import time
import tomllib
import types
import typing
import urllib.request
from typing import Any

import helm_python as helm
import pytest
import yaml
from pydantic import BaseModel, WithJsonSchema

from conftest import EXAMPLES, ROOT
from invalid_values import INVALID
from rollfleet.fields import Fragment
from rollfleet.render import render_objects
from rollfleet.spec import (DEFAULT_ENV, IMAGE_TAG, FleetSpec, SpecError, cross_field_problems, json_schema,
                            load_spec, runtime_config)
from rollfleet.validate import validate_objects
from rollfleet.values import load_values, merge_default_maps

CHART = ROOT / "charts" / "rollfleet"
RELEASE = "fleet"
CHART_LABEL = "helm.sh/chart"
MANAGED_BY = "app.kubernetes.io/managed-by"
# What the parity test ignores, and why:
# - helm.sh/chart: Helm's chart-name-version label, on the chart's top-level objects only;
# - app.kubernetes.io/managed-by: "Helm" from the chart, "rollfleet" from the CLI (so `rollfleet down`,
#   which deletes by managed-by=rollfleet, never deletes a Helm release's objects).
HELM_ONLY_LABELS = (CHART_LABEL, MANAGED_BY)
# - the `helm test` hooks (ServiceAccount, Role, RoleBinding, Pod): the CLI has no test pod.
TEST_HOOKS = "rollfleet/templates/tests/"
DIGEST = "sha256:" + "0123456789abcdef" * 4


# --- rendering helpers ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART) as loaded:
        yield loaded


def helm_render(chart, values: dict[str, Any], name: str = RELEASE, namespace: str = "default") -> dict[str, str]:
    """Template path -> rendered text, as `helm template NAME charts/rollfleet -n NAMESPACE -f values` gives it."""
    return chart.render(values, name=name, namespace=namespace)


def helm_render_as_cli(chart, values: dict[str, Any]) -> dict[str, str]:
    """As `helm template <values' name> -n <values' namespace>`: the release whose objects are named and placed
    as `rollfleet render` names and places them (the chart names objects after the release)."""
    spec = load_spec(merge_default_maps(values))
    return helm_render(chart, values, spec.name, spec.namespace)


KIND_ORDER = ["ConfigMap", "RayJob", "RayCluster", "NetworkPolicy", "PodMonitor", "PrometheusRule"]  # the CLI's order


def _place(obj: dict) -> int:
    """Where the CLI renders `obj`: by kind, the dashboard's ConfigMap last."""
    if obj["kind"] == "ConfigMap" and obj["metadata"]["name"].endswith("-dashboard"):
        return len(KIND_ORDER)
    return KIND_ORDER.index(obj["kind"]) if obj["kind"] in KIND_ORDER else len(KIND_ORDER) + 1


def objects_of(rendered: dict[str, str], tests: bool = False) -> list[dict]:
    """The rendered objects (without the `helm test` hooks unless `tests`), in the CLI's order."""
    objs = [obj for path, text in rendered.items() if path.endswith(".yaml")
            and (tests or not path.startswith(TEST_HOOKS)) for obj in yaml.safe_load_all(text) if obj]
    return sorted(objs, key=_place)


def cli_objects(values: dict[str, Any]) -> list[dict]:
    """What `rollfleet render -f` gives for these values (load_values = merge_default_maps + load_spec)."""
    return render_objects(load_spec(merge_default_maps(values)))


def without_helm_labels(obj: Any, managed_by: str) -> Any:
    """`obj` with HELM_ONLY_LABELS removed from every `labels` map, after checking their values."""
    if isinstance(obj, list):
        return [without_helm_labels(o, managed_by) for o in obj]
    if not isinstance(obj, dict):
        return obj
    out = {}
    for key, value in obj.items():
        if key == "labels" and isinstance(value, dict) and MANAGED_BY in value:
            assert value[MANAGED_BY] == managed_by, value
            value = {k: v for k, v in value.items() if k not in HELM_ONLY_LABELS}
        out[key] = without_helm_labels(value, managed_by)
    return out


def assert_same_objects(helm_objs: list[dict], cli_objs: list[dict]) -> None:
    """Equal objects, but for HELM_ONLY_LABELS; the ConfigMap's fleet.json compared as parsed JSON (Go
    escapes <, >, & and writes 1.0 as 1; the examples are byte-equal, checked separately)."""
    assert [o["kind"] for o in helm_objs] == [o["kind"] for o in cli_objs]
    for h in helm_objs:  # helm.sh/chart sits on the top-level objects only (not on pod templates)
        assert h["metadata"]["labels"][CHART_LABEL] == f"rollfleet-{chart_yaml()['version']}"
    helm_objs, cli_objs = (without_helm_labels(objs, managed_by) for objs, managed_by in
                           ((helm_objs, "Helm"), (cli_objs, "rollfleet")))
    for obj in (*helm_objs, *cli_objs):
        if obj["kind"] == "ConfigMap" and "fleet.json" in obj["data"]:
            obj["data"]["fleet.json"] = json.loads(obj["data"]["fleet.json"])
    assert helm_objs == cli_objs


def chart_yaml() -> dict:
    return yaml.safe_load((CHART / "Chart.yaml").read_text())


def config_of(objs: list[dict]) -> str:
    (cm,) = [o for o in objs if o["kind"] == "ConfigMap" and "fleet.json" in o["data"]]
    return cm["data"]["fleet.json"]


def cluster_of(objs: list[dict]) -> dict:
    (top,) = [o for o in objs if o["kind"] in ("RayJob", "RayCluster")]
    return top["spec"]["rayClusterSpec"] if top["kind"] == "RayJob" else top["spec"]


def helm_cluster(chart, values: dict) -> dict:
    return cluster_of(objects_of(helm_render(chart, values)))


def containers(cluster: dict) -> dict[str, dict]:
    pods = {"head": cluster["headGroupSpec"], **{g["groupName"]: g for g in cluster["workerGroupSpecs"]}}
    return {name: g["template"]["spec"]["containers"][0] for name, g in pods.items()}


# --- parity over every example ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def example_renders(chart) -> dict[str, tuple[dict[str, str], list[dict]]]:
    """Per example: (Helm's render of the file as `-f` reads it, the CLI's objects). Rendered once."""
    renders = {}
    for example in EXAMPLES:
        spec = load_values(example)
        renders[example.name] = (helm_render(chart, helm.values_from_yaml(example.read_text()), spec.name,
                                             spec.namespace), render_objects(spec))
    return renders


@pytest.mark.parametrize("example", [e.name for e in EXAMPLES])
def test_chart_renders_the_objects_of_the_cli(example_renders, example):
    rendered, cli = example_renders[example]
    assert_same_objects(objects_of(rendered), cli)


@pytest.mark.parametrize("example", [e.name for e in EXAMPLES])
def test_runtime_config_is_byte_equal_and_parses_to_the_cli_spec(example_renders, example):
    rendered, cli = example_renders[example]
    text = config_of(objects_of(rendered))
    assert text == config_of(cli)  # Go's toPrettyJson == json.dumps(indent=2, sort_keys=True) here
    assert load_spec(json.loads(text)) == load_values(ROOT / "manifests" / "examples" / example)


def names(objs: list[dict]) -> set[tuple[str, str]]:
    return {(o["metadata"]["name"], o["metadata"]["namespace"]) for o in objs}


def test_objects_are_named_after_the_release_so_two_releases_never_collide(chart):
    values = helm.values_from_yaml((ROOT / "manifests/examples/one-node-8gpu.yaml").read_text())  # namespace: rl
    one, other = (objects_of(chart.render(values, name=n, namespace="team")) for n in ("one", "another-release"))
    assert names(one) == {("one-config", "rl"), ("one", "rl")}  # the values' namespace wins over -n
    assert names(other) == {("another-release-config", "rl"), ("another-release", "rl")}
    fleet = json.loads(config_of(other))
    assert (fleet["name"], fleet["namespace"]) == ("another-release", "rl")  # the launcher sees its own names
    cluster = cluster_of(other)
    assert cluster["headGroupSpec"]["template"]["spec"]["volumes"][0]["configMap"] == {"name": "another-release-config"}
    assert cluster["headGroupSpec"]["template"]["metadata"]["labels"]["app.kubernetes.io/instance"] == "another-release"


def test_objects_go_to_the_release_namespace_unless_the_values_say_otherwise(chart):
    for values in ({}, {"namespace": "default"}):
        objs = objects_of(chart.render(values, name="fleet", namespace="team"))
        assert names(objs) == {("fleet-config", "team"), ("fleet", "team")}
        assert json.loads(config_of(objs))["namespace"] == "team"
    assert names(objects_of(chart.render({"namespace": "rl"}, name="fleet", namespace="team"))) == {
        ("fleet-config", "rl"), ("fleet", "rl")}


@pytest.mark.parametrize("release", ["a" * 41, "9lives", "my.fleet"])
def test_a_release_name_kuberay_cannot_use_fails_with_the_rule(chart, release):
    with pytest.raises(helm.HelmRenderError, match=f'release name "{release}": the chart names its objects after the '
                                                   f"release and KubeRay appends suffixes to them; use a release name"):
        chart.render({}, name=release, namespace="default")


# --- parity beyond the examples: what Helm's value handling changes ------------------------------------

def _fields(model: type[BaseModel], prefix: tuple[str, ...] = ()):
    """(camelCase path, FieldInfo) of every field of `model`, nested sections included (not the insides of
    Kubernetes fragments, which keep only the keys given, as Helm does)."""
    for name, field in model.model_fields.items():
        path = (*prefix, field.alias or name)
        yield path, field
        for arg in (field.annotation, *typing.get_args(field.annotation)):
            if isinstance(arg, type) and issubclass(arg, BaseModel) and not issubclass(arg, Fragment):
                yield from _fields(arg, path)


def _is_quantity(annotation) -> bool:
    """A field typed with fields.Quantity or fields.Bytes (possibly `| None`)."""
    for arg in (annotation, *typing.get_args(annotation)):
        for m in getattr(arg, "__metadata__", ()):
            if isinstance(m, WithJsonSchema) and {"type": "integer", "minimum": 0} in m.json_schema.get("anyOf", []):
                return True
    return False


def _nullable(annotation) -> bool:
    return type(None) in typing.get_args(annotation)


def _nest(path: tuple[str, ...], value: Any) -> dict:
    out: Any = value
    for part in reversed(path):
        out = {part: out}
    return out


# Helm deletes a key set to null (and drops null defaults); the chart must put each back as null.
NULLABLE = [p for p, field in _fields(FleetSpec) if _nullable(field.annotation)]
QUANTITIES = [p for p, field in _fields(FleetSpec) if _is_quantity(field.rebuild_annotation())]
FULL_VALUES = {
    "name": "full", "namespace": "team-a", "engine": "vllm",
    "image": {"repository": "registry.example/rollfleet", "digest": DIGEST, "pullPolicy": "Always",
              "pullSecrets": ["one", "two"]},
    "head": {"cpu": 2, "memory": 8589934592, "ephemeralStorage": "50Gi", "nodeSelector": {"pool": "cpu"},
             "tolerations": [{"key": "cpu-only", "operator": "Exists", "effect": "NoSchedule"}],
             "affinity": {"nodeAffinity": {"preferredDuringSchedulingIgnoredDuringExecution": [
                 {"weight": 10, "preference": {"matchExpressions": [{"key": "cpu", "operator": "Exists"}]}}]}}},
    "pools": {
        "trainer": {"nodes": 3, "gpusPerNode": 8, "cpu": "95500m", "memory": "1.5Ti", "shmSize": 10**10,
                    "ephemeralStorage": 10**11,
                    "affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
                        {"topologyKey": "kubernetes.io/hostname",
                         "labelSelector": {"matchLabels": {"app.kubernetes.io/component": "trainer"}}}]}},
                    "gpuProduct": None, "nodeSelector": {"node.kubernetes.io/instance-type": "p5.48xlarge"},
                    "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "", "effect": "NoExecute"},
                                    {"operator": "Exists"}],
                    "labels": {"team": "rl", "app.kubernetes.io/name": "overridden-by-the-standard-set"},
                    "annotations": {"example.com/note": "a: b & <c>"},
                    "rdma": {"enabled": True, "resourceName": "nvidia.com/hostdev", "count": 4}},
        "inference": {"nodes": 2, "gpusPerNode": 6, "gpuProduct": "NVIDIA-A100-SXM4-80GB",
                      "nodeSelector": {"nvidia.com/gpu.product": "NVIDIA-H200"}},
    },
    "model": {"name": "Qwen/Qwen2.5-0.5B", "revision": "main", "dtype": "auto", "maxModelLen": None,
              "hfTokenSecret": {"name": "hf"}},
    "vllm": {"tensorParallelSize": 2, "gpuMemoryUtilization": 1, "maxNumSeqs": 64, "enforceEager": True,
             "seed": 7, "extraEngineArgs": {"kv_cache_dtype": "fp8", "limit_mm_per_prompt": {"image": 0}, "disable_log_stats": None}},
    "sync": {"bucketMiB": 2048, "verifyChecksums": False, "timeoutSeconds": 1000000},
    "timeouts": {"initSeconds": 25, "healthSeconds": 3600001},
    "job": {"entrypoint": "my_pkg.train:main", "steps": 7, "submissionMode": "HTTPMode",
            "activeDeadlineSeconds": 86400, "shutdownAfterJobFinishes": False},
    "ncclEnv": {"NCCL_IB_HCA": "mlx5", "NCCL_DEBUG": "INFO"},
    "env": {"HF_HOME": "/cache", "lower_case": "x", "VLLM_LOGGING_LEVEL": "INFO", "VLLM_ATTENTION_BACKEND": None},
    "secretEnv": {"WANDB_API_KEY": {"name": "wandb", "key": "api-key"}, "OTHER_TOKEN": {"name": "other"}},
    "rayAuth": {"mode": "token", "secretName": "ray-token"},
    "gangScheduling": {"scheduler": "volcano", "queue": "rl"},
    "priorityClassName": "training-high", "serviceAccountName": "fleet",
    "podSecurity": {"runAsUser": 2000, "runAsGroup": 2000, "fsGroup": None, "seccompProfile": "Unconfined"},
    "volumes": [{"name": "hf-cache", "claimName": "hf-cache", "mountPath": "/home/ray/.cache/huggingface"},
                {"name": "ckpt", "claimName": "checkpoints", "mountPath": "/ckpt", "subPath": "run-1",
                 "readOnly": False, "groups": ["trainer"]},
                {"name": "data", "claimName": "data", "mountPath": "/data", "readOnly": True, "groups": ["head", "inference"]}],
    "networkPolicy": {"operatorNamespace": "kuberay-system",
                      "ingress": [{"namespace": "monitoring", "ports": ["metrics"]},
                                  {"namespace": "ci", "ports": ["dashboard", "client"]}]},
    "global": {"imageRegistry": "ignored"},
}
COLOCATED = {"pools": {"colocated": {"nodes": 2, "gpusPerNode": 2, "cpu": 16, "memory": 549755813888,
                                     "shmSize": 68719476736, "ephemeralStorage": 10**11, "rdma": {"enabled": True}}},
             "vllm": {"gpuMemoryUtilization": 0.5}, "rollout": {"maxStaleness": 0},
             "volumes": [{"name": "ckpt", "claimName": "ckpt", "mountPath": "/ckpt", "groups": ["trainer"]},
                         {"name": "logs", "claimName": "logs", "mountPath": "/logs", "groups": ["head"]}]}
EDGE_CASES = {
    "defaults": {},
    "monitoring-on-policy": {"name": "mon", "rollout": {"maxStaleness": 0}, "networkPolicy": {"enabled": False},
                             "monitoring": {"podMonitor": {"enabled": True, "intervalSeconds": 5},
                                            "alerts": {"enabled": True, "restarts": 1, "noStepMinutes": 7,
                                                       "pushSeconds": 45, "labels": {"team": "rl"}},
                                            "dashboard": {"enabled": True, "labels": {"dash": "yes"}}}},
    "monitoring-staleness-9": {"rollout": {"maxStaleness": 9}, "monitoring": {
        "scraper": {"namespace": "obs", "podLabels": {"app": "prom"}}, "alerts": {"enabled": True}}},
    "every-field": FULL_VALUES,
    "standing-cluster": {"job": {"enabled": False}, "image": {"pullSecrets": ["creds"]}},
    "job-without-shutdown": {"job": {"shutdownAfterJobFinishes": False, "activeDeadlineSeconds": 60}},
    "cpu-standin": {"engine": "cpu-standin", "pools": {"inference": {"gpusPerNode": 3}}},
    "http-mode-no-policy": {"job": {"submissionMode": "HTTPMode"}, "networkPolicy": {"enabled": False}},
    "kueue": {"gangScheduling": {"scheduler": "kueue", "queue": "team-a"}, "job": {"enabled": False}},
    "yunikorn": {"gangScheduling": {"scheduler": "yunikorn", "queue": "root.rl"}, "rayVersion": "2.10.0"},
    "old-ray-no-auth": {"rayVersion": "2.10.0", "rayAuth": {"mode": "auto"}},
    # each quantity as a bare integer: the model (and the chart) make it a string
    "integer-quantities": {"head": {"cpu": 1, "memory": 8589934592, "ephemeralStorage": 10**11}, **_nest(("pools",), {
        pool: {"cpu": 64, "memory": 1099511627776, "shmSize": 68719476736, "ephemeralStorage": 10**12}
        for pool in ("trainer", "inference")})},
    # env/ncclEnv merge into their defaults in both (Helm's coalescing; rollfleet.render.merge_default_maps)
    "env-added-to-defaults": {"env": {"HF_HOME": "/cache"}, "ncclEnv": {"NCCL_IB_HCA": "mlx5"}},
    "env-default-removed-with-null": {"env": {"VLLM_LOGGING_LEVEL": None}},
    "toleration-defaults": {"pools": {"inference": {"tolerations": [{"key": "a"}, {"key": "b", "value": ""}]}}},
    **{f"null-{'.'.join(p)}": _nest(p, None) for p in NULLABLE if "tolerations" not in p},
    "colocated": COLOCATED,
}
# the colocated pool's nullable fields, inside a valid colocated layout (its own rules need these)
for _p in NULLABLE:
    if _p[:2] == ("pools", "colocated") and len(_p) > 2:
        EDGE_CASES[f"null-{'.'.join(_p)}"] = {**COLOCATED, "pools": {"colocated": {**COLOCATED["pools"]["colocated"],
                                                                                 _p[2]: None}}}


@pytest.mark.parametrize("values", EDGE_CASES.values(), ids=EDGE_CASES.keys())
def test_chart_matches_the_cli_beyond_the_examples(chart, values):
    rendered = helm_render_as_cli(chart, values)
    helm_objs, cli = objects_of(rendered), cli_objects(values)
    assert_same_objects(helm_objs, cli)
    assert runtime_config(load_spec(json.loads(config_of(helm_objs)))) == runtime_config(
        load_spec(merge_default_maps(values)))


def test_cli_merges_env_into_the_defaults_as_helm_does(tmp_path):
    """rollfleet.render.merge_default_maps (here because Helm's coalescing is the reason for it)."""
    values = tmp_path / "values.yaml"
    values.write_text("ncclEnv: {NCCL_IB_HCA: mlx5}\nenv: {HF_HOME: /cache, VLLM_LOGGING_LEVEL: null}\n")
    spec = load_values(values, ["env.EXTRA=x"])
    assert spec.nccl_env == {"NCCL_CUMEM_ENABLE": "0", "NCCL_IB_HCA": "mlx5"}
    assert spec.env == {**{k: v for k, v in DEFAULT_ENV.items() if k != "VLLM_LOGGING_LEVEL"},
                        "HF_HOME": "/cache", "EXTRA": "x"}
    values.write_text("env: {NOT_A_DEFAULT: null}\n")
    with pytest.raises(SpecError, match="env.NOT_A_DEFAULT"):
        load_values(values)


def test_every_nullable_and_quantity_field_has_an_edge_case():
    """New model fields that Helm's value handling changes (nullable, quantity) need the chart's attention:
    rollfleet.config in templates/_config.tpl restores nulls and stringifies quantities. (Toleration
    fields are list items: the toleration-defaults case covers them.)"""
    assert NULLABLE and QUANTITIES
    for path in NULLABLE:
        if "tolerations" not in path:
            assert f"null-{'.'.join(path)}" in EDGE_CASES
    config = (CHART / "templates" / "_config.tpl").read_text()
    for path in NULLABLE:  # (pools.colocated's own fields come from rollfleet.poolDefaults, nulls included)
        if "tolerations" not in path and path[:2] != ("pools", "colocated") or len(path) == 2:
            assert f'"{".".join(path)}"' in config, f"{'.'.join(path)} is nullable; add it to $nullable"
    for path in QUANTITIES:
        assert f'"{path[-1]}"' in config, f"{'.'.join(path)} is a quantity; stringify it in rollfleet.config"
        node = EDGE_CASES["colocated" if path[:2] == ("pools", "colocated") else "integer-quantities"]
        for part in path:
            node = node[part]
        assert isinstance(node, int), f"{'.'.join(path)}: add it as an integer to the integer-quantities case"


# --- the cross-field rules fail in Helm with the CLI's message ------------------------------------------

RULE_CASES = {
    "scraper-namespace-without-labels": {"monitoring": {"scraper": {"namespace": "monitoring"}}},
    "scraper-labels-without-namespace": {"monitoring": {"scraper": {"podLabels": {"app": "prometheus"}}}},
    "pod-monitor-behind-the-network-policy": {"monitoring": {"podMonitor": {"enabled": True}}},
    "shm-exceeds-memory": {"pools": {"trainer": {"memory": "1500Mi", "shmSize": "1.5Gi"},
                                     "inference": {"memory": 1073741824, "shmSize": "2Gi"}}},
    "shm-below-minimum": {"pools": {"trainer": {"shmSize": "64Mi"}, "inference": {"shmSize": 1000000}}},
    "annotations-too-large": {"pools": {"inference": {"annotations": {"a": "x" * 200000, "b": "y" * 70000}}}},
    "tp-exceeds-node": {"vllm": {"tensorParallelSize": 8}},
    "tp-does-not-divide": {"vllm": {"tensorParallelSize": 3}},
    "min-engines-above-engines": {"recovery": {"minEngines": 9}},
    "prefix-caching-v0": {"env": {"VLLM_USE_V1": "0"}},
    "cpu-standin-tp": {"engine": "cpu-standin", "vllm": {"tensorParallelSize": 2}},
    "auth-token-old-ray": {"rayVersion": "2.10.0", "rayAuth": {"mode": "token"}},
    "kueue-without-queue": {"gangScheduling": {"scheduler": "kueue"}},
    "queue-without-scheduler": {"gangScheduling": {"queue": "rl"}},
    "secret-env-also-in-env": {"secretEnv": {"HF_HOME": {"name": "s"}}, "env": {"HF_HOME": "/x"}},
    "volumes-not-unique": {"volumes": [{"name": "a", "claimName": "a", "mountPath": "/a"},
                                       {"name": "a", "claimName": "b", "mountPath": "/a/"}]},
    "runtime-env-without-job": {"job": {"enabled": False, "runtimeEnv": {"pip": ["math-verify==0.7.0"]}}},
    "colocated-with-every-problem": {"pools": {"colocated": {"gpusPerNode": 4}, "trainer": {"nodes": 2},
                                               "inference": {"gpusPerNode": 2}},
                                     "vllm": {"tensorParallelSize": 2, "gpuMemoryUtilization": 0.9},
                                     "sync": {"inflight": "abort"}, "rollout": {"maxStaleness": 2}},
    "colocated-tp-not-a-divisor": {"pools": {"colocated": {"gpusPerNode": 3}}, "vllm": {"tensorParallelSize": 2,
                                   "gpuMemoryUtilization": 0.5}, "rollout": {"maxStaleness": 0}},
    "many-at-once": {"vllm": {"tensorParallelSize": 3}, "env": {"VLLM_USE_V1": "0"},
                     "gangScheduling": {"scheduler": "kueue"}},
}


def cli_problems(values: dict) -> list[str]:
    with pytest.raises(SpecError) as error:
        load_spec(merge_default_maps(values))
    return error.value.problems


def helm_problems(chart, values: dict) -> list[str]:
    with pytest.raises(helm.HelmRenderError) as error:
        helm_render(chart, values)
    message = str(error.value)
    header, _, problems = message.partition("\n")
    assert "rollfleet rule(s) (the same checks as `rollfleet validate`):" in header, message
    return problems.splitlines()


@pytest.mark.parametrize("values", RULE_CASES.values(), ids=RULE_CASES.keys())
def test_cross_field_rules_fail_in_helm_with_the_cli_message(chart, values):
    cli = cli_problems(values)
    assert cli, "the case must break a rule"
    assert sorted(helm_problems(chart, values)) == sorted(cli)


def test_every_cross_field_rule_has_a_case():
    """Each `p.append(...)` in spec.cross_field_problems runs for some RULE_CASES entry, so a new rule
    without a case here (and without its twin in templates/_validate.tpl) fails this test."""
    code = cross_field_problems.__code__
    source, first = inspect.getsourcelines(cross_field_problems)
    append_lines = {first + i for i, line in enumerate(source) if "p.append(" in line}
    hit: set[int] = set()

    def tracer(frame, event, arg):
        if frame.f_code is code:
            if event == "line":
                hit.add(frame.f_lineno)
            return tracer
        return None

    old = sys.gettrace()
    sys.settrace(tracer)
    try:
        for values in RULE_CASES.values():
            try:
                load_spec(merge_default_maps(values))
            except SpecError:
                pass
    finally:
        sys.settrace(old)
    missing = sorted(append_lines - hit)
    assert not missing, f"rules at spec.py lines {missing} have no case in RULE_CASES (and _validate.tpl)"


# --- the schema, values.yaml and Chart.yaml come from the model ----------------------------------------

def test_values_schema_is_generated_from_the_model():
    committed = (CHART / "values.schema.json").read_text()
    assert committed == json.dumps(json_schema(), indent=2, sort_keys=True) + "\n", \
        "charts/rollfleet/values.schema.json is stale: run `make schema`"


def test_values_yaml_defaults_are_the_model_defaults(chart):
    # chart.values: values.yaml as Helm parses it, nulls included
    assert chart.values == FleetSpec().model_dump(mode="json", by_alias=True)
    assert {k: v for k, v in chart.values.items() if k != "global"} == runtime_config(FleetSpec())


def test_every_values_key_is_documented():
    """Every key in values.yaml has a `# --` comment (helm-docs style) right above it."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    undocumented = []
    for i, line in enumerate(lines):
        if line.strip() and not line.lstrip().startswith("#"):
            j = i - 1
            while j >= 0 and lines[j].lstrip().startswith("#") and not lines[j].lstrip().startswith("# --"):
                j -= 1  # continuation lines of the comment
            if j < 0 or not lines[j].lstrip().startswith("# --"):
                undocumented.append(line.strip())
    assert not undocumented, f"values.yaml keys without a `# --` comment: {undocumented}"


def test_chart_yaml_versions():
    meta = chart_yaml()
    assert meta["apiVersion"] == "v2"
    assert meta["appVersion"] == IMAGE_TAG == FleetSpec().image.tag
    assert meta["version"] == tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]


def test_helm_accepts_the_schema_and_every_example(chart):
    assert chart.schema == json_schema()
    chart.validate_schema({})
    for example in EXAMPLES:
        chart.validate_schema(helm.values_from_yaml(example.read_text()))


@pytest.mark.parametrize("values, where", [
    ({"bogus": 1}, "additional properties 'bogus'"),
    ({"pools": {"trainer": {"gpusPerNodes": 8}}}, "/pools/trainer"),
    ({"pools": {"trainer": {"gpusPerNode": 17}}}, "/pools/trainer/gpusPerNode"),
    ({"pools": {"inference": {"memory": "lots"}}}, "/pools/inference/memory"),
    ({"head": {"cpu": -1}}, "/head/cpu"),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ({"image": {"digest": "sha256:short"}}, "/image/digest"),
    ({"job": {"entrypoint": "not a function"}}, "/job/entrypoint"),
    ({"env": {"VLLM_USE_V1": 1}}, "/env/VLLM_USE_V1"),
    ({"pools": {"trainer": {"tolerations": [{"operator": "Sometimes"}]}}}, "/pools/trainer/tolerations/0"),
])
def test_helm_refuses_what_the_model_refuses(chart, values, where):
    with pytest.raises(SpecError):
        load_spec(merge_default_maps(values))
    with pytest.raises(helm.HelmValuesError, match=where):
        helm_render(chart, values)


@pytest.mark.parametrize(("values", "path"), [c[1:3] for c in INVALID], ids=[c[0] for c in INVALID])
def test_chart_refuses_every_invalid_case(chart, values, path):
    """tests/invalid_values.py: every case the CLI refuses, Helm refuses too (its schema, or _validate.tpl)."""
    with pytest.raises(SpecError):
        load_spec(merge_default_maps(values))
    with pytest.raises((helm.HelmValuesError, helm.HelmRenderError)):
        helm_render(chart, values)


def test_strict_lint_is_clean():
    """`helm lint --strict` on the defaults and on every example: no warnings, no errors (the only message
    is Helm's informational "icon is recommended")."""
    for values in [None, *(helm.values_from_yaml(e.read_text()) for e in EXAMPLES)]:
        report = helm.lint(CHART, values, strict=True)
        assert report["errors"] == [], report
        assert [m for m in report["messages"] if m["severity"] >= 2] == [], report


def test_test_hooks_are_valid_kubernetes(example_renders):
    """ServiceAccount, Role, RoleBinding and Pod against Kubernetes' schemas (strict). The other objects
    equal the CLI's, which tests/test_render.py validates against the KubeRay CRDs."""
    for rendered, _ in example_renders.values():
        hooks = [o for o in yaml.safe_load_all(rendered[TEST_HOOKS + "cluster-test.yaml"]) if o]
        assert validate_objects(hooks) == []


# --- key paths of the rendered objects -----------------------------------------------------------------

def test_gpu_limits_and_ray_resources_per_pool(chart):
    c = helm_cluster(chart, {"pools": {"trainer": {"gpusPerNode": 2}, "inference": {"gpusPerNode": 8}}})
    groups = {g["groupName"]: g for g in c["workerGroupSpecs"]}
    for pool, gpus in (("trainer", 2), ("inference", 8)):
        limits = containers(c)[pool]["resources"]["limits"]
        assert limits["nvidia.com/gpu"] == gpus  # Ray's num-gpus follows the limit
        assert groups[pool]["resources"] == {pool: str(gpus)}
    head = c["headGroupSpec"]
    assert head["rayStartParams"]["num-gpus"] == "0"
    assert "nvidia.com/gpu" not in containers(c)["head"]["resources"]["limits"]
    assert {"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"} in containers(c)["head"]["env"]


def test_node_selectors_and_tolerations(chart):
    c = helm_cluster(chart, {"pools": {
        "trainer": {"gpuProduct": None, "tolerations": [{"key": "rl", "value": "x", "operator": "Equal"}]},
        "inference": {"nodeSelector": {"zone": "a"}}}})
    spec = {g["groupName"]: g["template"]["spec"] for g in c["workerGroupSpecs"]}
    assert spec["trainer"]["nodeSelector"] == {}
    assert spec["inference"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3", "zone": "a"}
    gpu_toleration = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    assert spec["trainer"]["tolerations"] == [gpu_toleration, {"key": "rl", "operator": "Equal", "value": "x"}]
    assert spec["inference"]["tolerations"] == [gpu_toleration]


def test_shm_is_a_memory_emptydir_of_shm_size_on_every_worker(chart):
    c = helm_cluster(chart, {"pools": {"trainer": {"shmSize": "100Gi"}, "inference": {"shmSize": "32Gi"}}})
    for group in c["workerGroupSpecs"]:
        size = {"trainer": "100Gi", "inference": "32Gi"}[group["groupName"]]
        assert group["template"]["spec"]["volumes"] == [
            {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": size}}]
        assert {"name": "dshm", "mountPath": "/dev/shm"} in containers(c)[group["groupName"]]["volumeMounts"]


def test_nccl_env_is_identical_on_every_container(chart):
    nccl = {"NCCL_IB_HCA": "mlx5", "NCCL_SOCKET_IFNAME": "eth0"}
    c = helm_cluster(chart, {"ncclEnv": nccl})
    seen = [{e["name"]: e["value"] for e in ctr["env"] if e["name"].startswith("NCCL_")}
            for ctr in containers(c).values()]
    assert seen == [{"NCCL_CUMEM_ENABLE": "0", **nccl}] * 3


def test_secrets_by_reference_only(chart):
    values = {"model": {"hfTokenSecret": {"name": "hf-token", "key": "hf"}}, "image": {"pullSecrets": ["regcred"]}}
    rendered = helm_render(chart, values)
    c = cluster_of(objects_of(rendered))
    for ctr in containers(c).values():
        (token,) = [e for e in ctr["env"] if e["name"] == "HF_TOKEN"]
        assert token == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "hf"}}}
    for pod in [c["headGroupSpec"], *c["workerGroupSpecs"]]:
        assert pod["template"]["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    everything = [o for o in objects_of(rendered, tests=True)]
    assert not [o for o in everything if o["kind"] == "Secret"]


def test_probe_thresholds_are_derived_from_the_timeouts(chart):
    c = helm_cluster(chart, {"timeouts": {"initSeconds": 25, "healthSeconds": 1000001}})
    worker = containers(c)["inference"]
    assert worker["startupProbe"]["failureThreshold"] == 3  # ceil(25 / 10)
    assert worker["livenessProbe"]["failureThreshold"] == 100001  # an integer, never 1.00001e+05
    assert containers(c)["head"]["livenessProbe"]["failureThreshold"] == 100001


def test_notes_show_what_was_created_and_the_derived_engines(chart):
    values = helm.values_from_yaml((ROOT / "manifests/examples/multi-node-tp2.yaml").read_text())
    notes = chart.render(values, name="grpo-tp2", namespace="rl")["rollfleet/templates/NOTES.txt"]
    assert "RayJob/grpo-tp2" in notes and "ConfigMap/grpo-tp2-config" in notes
    assert "16 engine(s) x TP 2" not in notes  # 2 nodes x 8 GPUs / TP 2 = 8 engines
    assert "8 engine(s) x TP 2" in notes and "world size 17" in notes
    assert "kubectl logs -n rl job/grpo-tp2" in notes and "helm test grpo-tp2" in notes
    assert "rollfleet status grpo-tp2 -n rl" in notes
    assert "component=trainer -c ray-worker" in notes and "component=inference -c ray-worker" in notes
    assert "Pass `-n" not in notes  # release namespace == values namespace
    other = chart.render(values, name="grpo-tp2", namespace="default")["rollfleet/templates/NOTES.txt"]
    assert "Pass `-n rl` to helm" in other


# --- the `helm test` hook --------------------------------------------------------------------------------

def test_hooks(chart):
    values = helm.values_from_yaml((ROOT / "manifests/examples/one-node-8gpu.yaml").read_text())
    hooks = [o for o in yaml.safe_load_all(helm_render_as_cli(chart, values)[TEST_HOOKS + "cluster-test.yaml"]) if o]
    assert [o["kind"] for o in hooks] == ["ServiceAccount", "Role", "RoleBinding", "Pod"]
    for o in hooks:
        assert o["metadata"]["annotations"]["helm.sh/hook"] == "test"
        assert o["metadata"]["name"] == "grpo-8gpu-test" and o["metadata"]["namespace"] == "rl"
    assert hooks[1]["rules"] == [{"apiGroups": ["ray.io"], "resources": ["rayjobs"],
                                  "resourceNames": ["grpo-8gpu"], "verbs": ["get"]}]
    pod = hooks[3]
    assert pod["spec"]["serviceAccountName"] == "grpo-8gpu-test"
    assert pod["spec"]["containers"][0]["image"] == f"ghcr.io/rollfleet/runtime:{IMAGE_TAG}"
    standing = {**values, "job": {"enabled": False}}
    role = list(yaml.safe_load_all(helm_render_as_cli(chart, standing)[TEST_HOOKS + "cluster-test.yaml"]))[1]
    assert role["rules"][0]["resources"] == ["rayclusters"]


def hook_script(chart, values: dict) -> str:
    (pod,) = [o for o in yaml.safe_load_all(helm_render_as_cli(chart, values)[TEST_HOOKS + "cluster-test.yaml"])
              if o and o["kind"] == "Pod"]
    return pod["spec"]["containers"][0]["args"][0]


class _Node:
    def __init__(self, resources: dict, state: str = "ALIVE"):
        self.resources_total, self.state = resources, state


def run_hook_script(monkeypatch, script: str, status: dict, nodes: list[_Node]) -> tuple[int, list[str]]:
    """Run the hook's script against a fake API server answer (`status`) and fake Ray nodes, with a clock
    that advances 10 s per reading; returns (exit code, printed lines + what it asked for)."""
    asked: dict = {}
    printed: list[str] = []

    def list_nodes(address, **kwargs):
        asked["dashboard"] = address
        return nodes

    def urlopen(request, **kwargs):
        asked["url"] = request.full_url
        return io.StringIO(json.dumps({"status": status}))

    state = types.ModuleType("ray.util.state")
    state.list_nodes = list_nodes
    exception = types.ModuleType("ray.util.state.exception")
    exception.RayStateApiException = type("RayStateApiException", (Exception,), {})
    for name, module in {"ray": types.ModuleType("ray"), "ray.util": types.ModuleType("ray.util"),
                         "ray.util.state": state, "ray.util.state.exception": exception}.items():
        monkeypatch.setitem(sys.modules, name, module)
    clock = itertools.count(0, 10)
    monkeypatch.setattr(time, "monotonic", lambda: next(clock))
    monkeypatch.setattr(time, "sleep", lambda seconds: None)
    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    monkeypatch.setattr(ssl, "create_default_context", lambda **kwargs: None)
    script_globals = {"__name__": "__main__", "open": lambda path: io.StringIO("a-token"),
                      "print": lambda *args, **kwargs: printed.append(" ".join(map(str, args)))}
    with pytest.raises(SystemExit) as exit_:
        exec(compile(script, "cluster-test.yaml", "exec"), script_globals)
    return exit_.value.code, [*printed, json.dumps(asked)]


def test_hook_script_passes_when_every_gpu_registered(chart, monkeypatch):
    values = helm.values_from_yaml((ROOT / "manifests/examples/multi-node-tp2.yaml").read_text())
    script = hook_script(chart, values)
    nodes = [_Node({"CPU": 1.0})]  # the head: no GPUs
    nodes += [_Node({"CPU": 96.0, "GPU": 8.0, "trainer": 8.0})] * 2 + [_Node({"GPU": 8.0, "inference": 8.0})] * 2
    nodes += [_Node({"GPU": 8.0, "inference": 8.0}, state="DEAD")]  # a replaced pod: ignored
    code, out = run_hook_script(monkeypatch, script,
                                {"rayClusterStatus": {"head": {"serviceName": "grpo-tp2-abcde-head-svc"}}}, nodes)
    assert code == 0, out
    assert "/apis/ray.io/v1/namespaces/rl/rayjobs/grpo-tp2" in out[-1]
    assert "http://grpo-tp2-abcde-head-svc.rl.svc:8265" in out[-1]


def test_hook_script_fails_with_what_it_found(chart, monkeypatch):
    values = {"job": {"enabled": False}}
    script = hook_script(chart, values)
    nodes = [_Node({"CPU": 1.0}), _Node({"GPU": 4.0, "trainer": 4.0})]  # the inference pod never joined
    code, out = run_hook_script(monkeypatch, script, {"head": {"serviceName": "rollfleet-head-svc"}}, nodes)
    assert code == 1
    assert any("error: rayclusters/rollfleet did not show" in line and "'inference': 0" in line for line in out), out


# --- template injection: every string reaches the objects as data (Go templates) -------------------------

@pytest.fixture(scope="module")
def schemaless_chart(tmp_path_factory):
    """The chart without values.schema.json, so values no schema would let through reach the templates."""
    import shutil

    copy = tmp_path_factory.mktemp("chart") / "rollfleet"
    shutil.copytree(CHART, copy)
    (copy / "values.schema.json").unlink()
    with helm.Chart.load(copy) as loaded:
        yield loaded


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("bad", ["x\nhostNetwork: true\nimage: evil", "a: b # c - d", "{{ 7 * 7 }}}{&a *b", "'\"q\"\\"])
def test_adversarial_strings_never_change_the_shape_of_the_chart_objects(schemaless_chart, bad):
    """As tests/test_render.py does for the Jinja templates: every string field of the values at once."""
    from test_render import BASE, STRING_FIELDS, _paths, _with

    def shape(text: str) -> set[str]:
        spec = BASE
        for path, kind in STRING_FIELDS:
            if path[-1] in ("memory", "shm_size"):  # compared as quantities by _validate.tpl: kept valid
                continue
            value = {"str": text, "list": [text], "map": {text: text}}[kind]
            if path[-1] == "secret_env":  # a name env does not have (a cross-field rule)
                value = {text + "S": {"name": text, "key": text}}
            spec = _with(spec, path, value)
        values = spec.model_dump(mode="json", by_alias=True, warnings=False)
        objs = objects_of(schemaless_chart.render(values, name=RELEASE, namespace="default"), tests=True)
        return {p.replace(text, "<s>") for o in objs for p in _paths(o)}

    want, got = shape("benign"), shape(bad)
    assert got == want, f"paths only with {bad!r}: {sorted(got - want)[:10]}; missing: {sorted(want - got)[:10]}"


def test_the_charts_pool_defaults_are_the_models():
    """templates/_helpers.tpl `rollfleet.poolDefaults` (pools.colocated starts from it; the colocated rules compare
    pools.trainer / pools.inference with it) equals spec.Pool()'s defaults."""
    import re

    from rollfleet.spec import Pool

    text = (CHART / "templates" / "_helpers.tpl").read_text()
    body = re.search(r'define "rollfleet.poolDefaults" -}}\n(.*?)\n{{- end }}', text, re.S)[1]
    assert json.loads(body) == Pool().model_dump(mode="json", by_alias=True)


def test_notes_and_the_test_hook_know_the_colocated_layout(chart):
    values = helm.values_from_yaml((ROOT / "manifests/examples/one-node-8gpu-colocated.yaml").read_text())
    rendered = chart.render(values, name="grpo-colocated", namespace="rl")
    notes = rendered["rollfleet/templates/NOTES.txt"]
    assert "colocated  1 pod(s) x 8 GPU(s): a trainer rank and a TP=1 engine on each GPU = 8 engine(s)" in notes
    assert "CUDA IPC" in notes and "trainer    " not in notes
    assert "app.kubernetes.io/component=colocated -c ray-worker" in notes
    assert "component=trainer" not in notes and "component=inference" not in notes
    hook = rendered[TEST_HOOKS + "cluster-test.yaml"]
    assert 'WANT = {"GPU":8,"inference":8,"nodes":2,"trainer":8}' in hook  # one pod's GPUs count for all three
