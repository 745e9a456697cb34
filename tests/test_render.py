"""render.py and the Jinja templates: one test per spec field that reaches a manifest."""

from __future__ import annotations

import json
import math
import shutil

import jinja2
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rollfleet import render
from rollfleet.render import CONFIG_PATH, apply_sets, load_values, render_objects, to_yaml
from rollfleet.spec import DEFAULT_ENV, SpecError, load_spec
from rollfleet.validate import validate_objects

DIGEST = "sha256:" + "0123456789abcdef" * 4
STANDARD_LABELS = {"app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/component",
                   "app.kubernetes.io/managed-by"}


def objects(values: dict | None = None) -> dict[str, dict]:
    """The rendered objects of `values`, by kind."""
    objs = render_objects(load_spec(values or {}))
    by_kind = {o["kind"]: o for o in objs}
    assert len(by_kind) == len(objs)
    return by_kind


def cluster(values: dict | None = None) -> dict:
    """The RayCluster spec, wherever it sits (RayJob.spec.rayClusterSpec or RayCluster.spec)."""
    objs = objects(values)
    return objs["RayJob"]["spec"]["rayClusterSpec"] if "RayJob" in objs else objs["RayCluster"]["spec"]


def groups(values: dict | None = None) -> dict[str, dict]:
    return {g["groupName"]: g for g in cluster(values)["workerGroupSpecs"]}


def container(group: dict) -> dict:
    (c,) = group["template"]["spec"]["containers"]
    return c


def head(values: dict | None = None) -> dict:
    return cluster(values)["headGroupSpec"]


def env_of(c: dict) -> dict[str, dict]:
    names = [e["name"] for e in c["env"]]
    assert len(names) == len(set(names)), f"duplicate env names: {names}"
    return {e["name"]: e for e in c["env"]}


def all_containers(values: dict | None = None) -> list[dict]:
    c = cluster(values)
    return [container(c["headGroupSpec"]), *(container(g) for g in c["workerGroupSpecs"])]


# --- objects and kinds -------------------------------------------------------------------------------------


def test_job_enabled_renders_configmap_and_rayjob_with_embedded_cluster():
    objs = render_objects(load_spec({}))
    assert [o["kind"] for o in objs] == ["ConfigMap", "RayJob"]
    job = objs[1]
    assert job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["entrypoint"] == f"python -m rollfleet.runtime.launch --config {CONFIG_PATH}"
    assert set(job["spec"]["rayClusterSpec"]) >= {"rayVersion", "headGroupSpec", "workerGroupSpecs"}
    assert "upgradeStrategy" not in job["spec"]["rayClusterSpec"]


def test_job_disabled_renders_a_standalone_raycluster_with_recreate():
    objs = render_objects(load_spec({"job": {"enabled": False}}))
    assert [o["kind"] for o in objs] == ["ConfigMap", "RayCluster"]
    spec = objs[1]["spec"]
    assert spec["upgradeStrategy"] == {"type": "Recreate"}
    assert "entrypoint" not in spec and "rayClusterSpec" not in spec


@pytest.mark.parametrize("enabled", [True, False])
def test_name_and_namespace_on_every_object(enabled):
    objs = render_objects(load_spec({"name": "fleet-a", "namespace": "team-b", "job": {"enabled": enabled}}))
    assert [o["metadata"]["namespace"] for o in objs] == ["team-b", "team-b"]
    assert [o["metadata"]["name"] for o in objs] == ["fleet-a-config", "fleet-a"]


@pytest.mark.parametrize("word", ["yes", "no", "on", "off", "true", "null"])
def test_names_that_look_like_yaml_scalars_stay_strings(word):
    objs = render_objects(load_spec({"name": word, "namespace": word}))
    for o in objs:
        assert o["metadata"]["name"] in (word, f"{word}-config")
        assert o["metadata"]["namespace"] == word
    assert objs[0]["metadata"]["name"] == f"{word}-config"


@pytest.mark.parametrize("namespace", ["123", "017", "0x1f", "1e3"])
def test_numeric_looking_namespaces_stay_strings(namespace):
    for o in render_objects(load_spec({"namespace": namespace})):
        assert o["metadata"]["namespace"] == namespace


def test_ray_version_reaches_the_cluster():
    assert cluster({"rayVersion": "2.10.0"})["rayVersion"] == "2.10.0"
    assert cluster({})["enableInTreeAutoscaling"] is False


# --- pools -------------------------------------------------------------------------------------------------


def test_gpu_limits_and_replicas_come_from_pools():
    g = groups({"pools": {"trainer": {"nodes": 3, "gpusPerNode": 2}, "inference": {"nodes": 2, "gpusPerNode": 8}}})
    assert list(g) == ["trainer", "inference"]
    for name, nodes, gpus in (("trainer", 3, 2), ("inference", 2, 8)):
        assert container(g[name])["resources"]["limits"]["nvidia.com/gpu"] == gpus
        assert "nvidia.com/gpu" not in container(g[name])["resources"]["requests"]
        assert g[name]["replicas"] == g[name]["minReplicas"] == g[name]["maxReplicas"] == nodes
        assert g[name]["numOfHosts"] == 1


def test_cpu_and_memory_requests_equal_limits():
    g = groups({"pools": {"inference": {"cpu": "12", "memory": "100Gi", "shmSize": "10Gi"}}})
    res = container(g["inference"])["resources"]
    assert res["requests"] == {"cpu": "12", "memory": "100Gi"}
    assert {k: res["limits"][k] for k in ("cpu", "memory")} == {"cpu": "12", "memory": "100Gi"}


def test_integer_quantities_render_as_strings():
    res = container(groups({"pools": {"trainer": {"cpu": 48}}})["trainer"])["resources"]
    assert res["requests"]["cpu"] == res["limits"]["cpu"] == "48"


def test_group_level_ray_resources_pin_trainer_and_inference():
    g = groups({"pools": {"trainer": {"gpusPerNode": 2}, "inference": {"gpusPerNode": 8}}})
    assert g["trainer"]["resources"] == {"trainer": "2"}
    assert g["inference"]["resources"] == {"inference": "8"}
    assert g["trainer"]["rayStartParams"] == g["inference"]["rayStartParams"] == {}


def test_gpu_product_selects_nodes():
    g = groups({"pools": {"inference": {"gpuProduct": "NVIDIA-A100-SXM4-80GB", "nodeSelector": {"zone": "a"}}}})
    assert g["trainer"]["template"]["spec"]["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert g["inference"]["template"]["spec"]["nodeSelector"] == {
        "nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB", "zone": "a"}


def test_gpu_product_null_selects_any_gpu_node():
    g = groups({"pools": {"trainer": {"gpuProduct": None}}})
    assert g["trainer"]["template"]["spec"]["nodeSelector"] == {}
    assert "nvidia.com/gpu.product" in g["inference"]["template"]["spec"]["nodeSelector"]


def test_gpu_toleration_plus_pool_tolerations():
    gpu = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    g = groups({"pools": {"trainer": {"tolerations": [
        {"key": "dedicated", "operator": "Equal", "value": "rl", "effect": "NoSchedule"}, {"key": "spot"}]}}})
    assert g["trainer"]["template"]["spec"]["tolerations"] == [
        gpu, {"key": "dedicated", "operator": "Equal", "value": "rl", "effect": "NoSchedule"},
        {"key": "spot", "operator": "Exists"}]
    assert g["inference"]["template"]["spec"]["tolerations"] == [gpu]


def test_dev_shm_is_a_memory_emptydir_with_the_pool_size():
    g = groups({"pools": {"trainer": {"shmSize": "32Gi"}, "inference": {"shmSize": "100Gi"}}})
    for name, size in (("trainer", "32Gi"), ("inference", "100Gi")):
        spec = g[name]["template"]["spec"]
        assert spec["volumes"] == [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": size}}]
        assert {"name": "dshm", "mountPath": "/dev/shm"} in container(g[name])["volumeMounts"]


def test_pool_labels_and_annotations_reach_only_their_pod_template():
    g = groups({"name": "lab", "pools": {"inference": {
        "labels": {"team": "rl", "app.kubernetes.io/component": "hijack"}, "annotations": {"note": "x"}}}})
    inf, tr = g["inference"]["template"]["metadata"], g["trainer"]["template"]["metadata"]
    assert inf["labels"]["team"] == "rl"
    assert inf["labels"]["app.kubernetes.io/component"] == "inference"  # the standard set wins
    assert inf["labels"]["app.kubernetes.io/instance"] == "lab"
    assert inf["annotations"] == {"note": "x"}
    assert "team" not in tr["labels"] and "annotations" not in tr
    assert tr["labels"]["app.kubernetes.io/component"] == "trainer"


@pytest.mark.parametrize("enabled", [True, False])
def test_standard_labels_on_every_object_and_pod(enabled):
    objs = render_objects(load_spec({"name": "lbl", "job": {"enabled": enabled}}))
    for o in objs:
        assert STANDARD_LABELS <= set(o["metadata"]["labels"])
        assert o["metadata"]["labels"]["app.kubernetes.io/instance"] == "lbl"
        assert o["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "rollfleet"
    c = cluster({"name": "lbl", "job": {"enabled": enabled}})
    for group in (c["headGroupSpec"], *c["workerGroupSpecs"]):
        assert STANDARD_LABELS <= set(group["template"]["metadata"]["labels"])


def test_rdma_resource_and_ipc_lock_only_when_enabled():
    g = groups({"pools": {"trainer": {"rdma": {"enabled": True, "resourceName": "nvidia.com/hostdev", "count": 2}}}})
    tr, inf = container(g["trainer"]), container(g["inference"])
    assert tr["resources"]["limits"]["nvidia.com/hostdev"] == 2
    assert tr["securityContext"] == {"capabilities": {"add": ["IPC_LOCK"]}}
    assert set(inf["resources"]["limits"]) == {"cpu", "memory", "nvidia.com/gpu"}
    assert "securityContext" not in inf


def test_rdma_disabled_by_default():
    for c in all_containers({}):
        assert "securityContext" not in c
        assert not any(k.startswith("rdma/") for k in c["resources"]["limits"])


# --- image -------------------------------------------------------------------------------------------------


def test_image_tag_reference():
    for c in all_containers({"image": {"repository": "reg.example/rf", "tag": "1.2.3", "pullPolicy": "Always"}}):
        assert c["image"] == "reg.example/rf:1.2.3"
        assert c["imagePullPolicy"] == "Always"


def test_image_digest_wins_over_tag():
    for c in all_containers({"image": {"repository": "reg.example/rf", "tag": "1.2.3", "digest": DIGEST}}):
        assert c["image"] == f"reg.example/rf@{DIGEST}"


def test_pull_secrets_on_every_pod():
    c = cluster({"image": {"pullSecrets": ["a", "b"]}})
    for group in (c["headGroupSpec"], *c["workerGroupSpecs"]):
        assert group["template"]["spec"]["imagePullSecrets"] == [{"name": "a"}, {"name": "b"}]
    c = cluster({})
    for group in (c["headGroupSpec"], *c["workerGroupSpecs"]):
        assert "imagePullSecrets" not in group["template"]["spec"]


# --- environment -------------------------------------------------------------------------------------------


def test_nccl_env_is_identical_on_every_container():
    nccl = {"NCCL_CUMEM_ENABLE": "0", "NCCL_IB_HCA": "mlx5", "NCCL_SOCKET_IFNAME": "eth0"}
    seen = []
    for c in all_containers({"ncclEnv": nccl}):
        env = env_of(c)
        seen.append({k: v for k, v in env.items() if k.startswith("NCCL_")})
    assert seen[0] == {k: {"name": k, "value": v} for k, v in nccl.items()}
    assert all(s == seen[0] for s in seen)


def test_default_env_is_seeded_on_every_container():
    for c in all_containers({}):
        env = env_of(c)
        for k, v in DEFAULT_ENV.items():
            assert env[k] == {"name": k, "value": v}
        assert env["NCCL_CUMEM_ENABLE"] == {"name": "NCCL_CUMEM_ENABLE", "value": "0"}


def test_user_env_reaches_every_container_as_strings():
    for c in all_containers({"env": {"HF_HOME": "/cache", "WEIRD": "a: b # c", "NUMBER": "007"}}):
        env = env_of(c)
        assert env["HF_HOME"]["value"] == "/cache"
        assert env["WEIRD"]["value"] == "a: b # c"
        assert env["NUMBER"]["value"] == "007"


def test_hf_token_only_through_secret_key_ref():
    values = {"model": {"hfTokenSecret": {"name": "hf-creds", "key": "tok"}}}
    for c in all_containers(values):
        assert env_of(c)["HF_TOKEN"] == {
            "name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-creds", "key": "tok"}}}
    objs = render_objects(load_spec(values))
    assert "Secret" not in [o["kind"] for o in objs]
    text = to_yaml(objs)
    assert text.count("HF_TOKEN") == 3  # head + two worker groups, never in the ConfigMap


def test_no_hf_token_without_a_secret():
    for c in all_containers({}):
        assert "HF_TOKEN" not in env_of(c)
    assert "secretKeyRef" not in to_yaml(render_objects(load_spec({})))


# --- head --------------------------------------------------------------------------------------------------


def test_head_has_no_gpus_and_a_cluster_ip():
    h = head({"head": {"cpu": "2", "memory": "8Gi"}})
    assert h["serviceType"] == "ClusterIP"
    assert h["rayStartParams"]["num-gpus"] == "0"
    c = container(h)
    assert env_of(c)["NVIDIA_VISIBLE_DEVICES"] == {"name": "NVIDIA_VISIBLE_DEVICES", "value": "void"}
    assert c["resources"] == {"requests": {"cpu": "2", "memory": "8Gi"}, "limits": {"cpu": "2", "memory": "8Gi"}}


def test_ray_start_params_are_strings():
    c = cluster({})
    for group in (c["headGroupSpec"], *c["workerGroupSpecs"]):
        assert all(isinstance(v, str) for v in group["rayStartParams"].values())
        assert all(isinstance(v, str) for v in group.get("resources", {}).values())


def test_head_selector_and_tolerations_only_when_set():
    plain = head({})["template"]["spec"]
    assert "nodeSelector" not in plain and "tolerations" not in plain
    h = head({"head": {"nodeSelector": {"pool": "cpu"}, "tolerations": [{"key": "cpu-only", "effect": "NoSchedule"}]}})
    assert h["template"]["spec"]["nodeSelector"] == {"pool": "cpu"}
    assert h["template"]["spec"]["tolerations"] == [{"key": "cpu-only", "operator": "Exists", "effect": "NoSchedule"}]


# --- probes ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("init", "health"), [(1200, 600), (125, 5), (1, 1), (3601, 61)])
def test_probe_failure_thresholds_follow_timeouts(init, health):
    values = {"timeouts": {"initSeconds": init, "healthSeconds": health}}
    for g in groups(values).values():
        c = container(g)
        assert c["startupProbe"]["periodSeconds"] == 10
        assert c["startupProbe"]["failureThreshold"] == math.ceil(init / 10)
        assert c["livenessProbe"]["failureThreshold"] == math.ceil(health / 10)
        assert c["readinessProbe"]["failureThreshold"] == 3
    h = container(head(values))
    assert h["livenessProbe"]["failureThreshold"] == math.ceil(health / 10)
    assert "startupProbe" not in h
    assert "gcs_healthz" in h["livenessProbe"]["exec"]["command"][-1]


# --- job ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["K8sJobMode", "HTTPMode"])
def test_submission_mode(mode):
    assert objects({"job": {"submissionMode": mode}})["RayJob"]["spec"]["submissionMode"] == mode


def test_active_deadline_seconds_only_when_set():
    assert objects({"job": {"activeDeadlineSeconds": 7200}})["RayJob"]["spec"]["activeDeadlineSeconds"] == 7200
    assert "activeDeadlineSeconds" not in objects({})["RayJob"]["spec"]


def test_ttl_only_with_shutdown_after_job_finishes():
    spec = objects({"job": {"ttlSecondsAfterFinished": 60}})["RayJob"]["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] == 60
    spec = objects({"job": {"shutdownAfterJobFinishes": False, "ttlSecondsAfterFinished": 60}})["RayJob"]["spec"]
    assert spec["shutdownAfterJobFinishes"] is False and "ttlSecondsAfterFinished" not in spec


def test_ttl_zero_is_rendered():
    assert objects({"job": {"ttlSecondsAfterFinished": 0}})["RayJob"]["spec"]["ttlSecondsAfterFinished"] == 0


# --- the runtime config ------------------------------------------------------------------------------------


@pytest.mark.parametrize("enabled", [True, False])
def test_configmap_fleet_json_parses_back_to_the_spec(enabled):
    spec = load_spec({"name": "cfg", "vllm": {"tensorParallelSize": 2, "extraEngineArgs": {"kv_cache_dtype": "fp8"}},
                      "job": {"enabled": enabled, "entrypoint": "pkg.mod:train"}})
    cm = render_objects(spec)[0]
    assert cm["kind"] == "ConfigMap" and list(cm["data"]) == ["fleet.json"]
    assert load_spec(json.loads(cm["data"]["fleet.json"])) == spec


def test_head_mounts_the_configmap_where_the_launcher_reads_it():
    objs = objects({"name": "mnt"})
    c = container(objs["RayJob"]["spec"]["rayClusterSpec"]["headGroupSpec"])
    spec = objs["RayJob"]["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert {"name": "fleet-config", "mountPath": CONFIG_PATH.rsplit("/", 1)[0], "readOnly": True} in c["volumeMounts"]
    assert {"name": "fleet-config", "configMap": {"name": objs["ConfigMap"]["metadata"]["name"]}} in spec["volumes"]


def test_to_yaml_is_multi_document_and_round_trips():
    objs = render_objects(load_spec({}))
    text = to_yaml(objs)
    assert text.startswith("---\n") and text.count("\n---\n") == 1
    assert list(yaml.safe_load_all(text)) == objs
    assert "fleet.json: |" in text  # the runtime config stays readable


# --- apply_sets / load_values ------------------------------------------------------------------------------


def test_apply_sets_creates_nested_keys_and_parses_yaml_scalars():
    values = {"pools": {"trainer": {"nodes": 1}}}
    out = apply_sets(values, ["pools.inference.gpusPerNode=8", "vllm.enablePrefixCaching=false",
                              "image.digest=null", "name=grpo", "ncclEnv.NCCL_IB_HCA=mlx5", "model.revision="])
    assert out == {"pools": {"trainer": {"nodes": 1}, "inference": {"gpusPerNode": 8}},
                   "vllm": {"enablePrefixCaching": False}, "image": {"digest": None}, "name": "grpo",
                   "ncclEnv": {"NCCL_IB_HCA": "mlx5"}, "model": {"revision": ""}}
    assert values == {"pools": {"trainer": {"nodes": 1}}}  # the input is not mutated


def test_apply_sets_later_wins_and_overrides_the_file():
    assert apply_sets({"name": "a"}, ["name=b", "name=c"]) == {"name": "c"}


def test_apply_sets_value_may_contain_equals():
    assert apply_sets({}, ["env.OPTS=a=b"]) == {"env": {"OPTS": "a=b"}}


@pytest.mark.parametrize("item", ["pools.inference.gpusPerNode", "=3", ""])
def test_apply_sets_refuses_malformed_items(item):
    with pytest.raises(ValueError, match="--set"):
        apply_sets({}, [item])


def test_apply_sets_refuses_walking_through_a_scalar():
    with pytest.raises(ValueError, match="not a mapping"):
        apply_sets({"name": "x"}, ["name.first=y"])


def test_load_values_applies_sets_over_the_file(tmp_path):
    path = tmp_path / "v.yaml"
    path.write_text("name: from-file\npools:\n  inference: {gpusPerNode: 8}\n")
    spec = load_values(path, ["vllm.tensorParallelSize=4"])
    assert (spec.name, spec.pools.inference.gpus_per_node, spec.engines) == ("from-file", 8, 2)
    with pytest.raises(SpecError, match="vllm.tensorParallelSize"):
        load_values(path, ["vllm.tensorParallelSize=3"])


def test_load_values_empty_file_and_none_give_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    assert load_values(path) == load_values(None) == load_spec({})


def test_load_values_refuses_a_non_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    with pytest.raises(ValueError, match="must be a YAML mapping"):
        load_values(path)


# --- templates ---------------------------------------------------------------------------------------------


def test_templates_use_strict_undefined():
    env = render._env()
    assert env.undefined is jinja2.StrictUndefined
    with pytest.raises(jinja2.UndefinedError):
        env.from_string("{{ no_such_name }}").render(s=load_spec({}))
    with pytest.raises(jinja2.UndefinedError):
        env.from_string("{{ s.pools.inference.no_such_field }}").render(s=load_spec({}))


def test_a_template_referencing_an_undefined_name_fails_the_render(tmp_path, monkeypatch):
    for t in render.TEMPLATES.glob("*.j2"):
        shutil.copy(t, tmp_path / t.name)
    cm = tmp_path / "configmap.yaml.j2"
    cm.write_text(cm.read_text().replace("{{ config_name | tojson }}", "{{ config_nmae | tojson }}"))
    assert "config_nmae" in cm.read_text()
    monkeypatch.setattr(render, "TEMPLATES", tmp_path)
    with pytest.raises(jinja2.UndefinedError, match="config_nmae"):
        render_objects(load_spec({}))


# --- property: every valid spec renders the GPUs it asks for and validates strictly ------------------------

DNS1035 = st.from_regex(r"\A[a-z]([-a-z0-9]{0,20}[a-z0-9])?\Z")
DNS1123 = st.from_regex(r"\A[a-z0-9]([-a-z0-9]{0,20}[a-z0-9])?\Z")
YAML_LOOKALIKES = st.sampled_from(["yes", "no", "on", "off", "true", "null", "y", "n"])


@st.composite
def valid_values(draw) -> dict:
    inference_gpus = draw(st.integers(1, 16))
    engine = draw(st.sampled_from(["vllm", "cpu-standin"]))
    divisors = [d for d in range(1, inference_gpus + 1) if inference_gpus % d == 0]
    tp = draw(st.sampled_from(divisors)) if engine == "vllm" else 1  # the CPU stand-in has no TP

    def pool(gpus_per_node: int) -> dict:
        memory = draw(st.integers(1, 2048))
        return {
            "nodes": draw(st.integers(1, 4)),
            "gpusPerNode": gpus_per_node,
            "cpu": draw(st.sampled_from(["500m", "8", 96, "1.5"])),
            "memory": f"{memory}Gi",
            "shmSize": draw(st.sampled_from([f"{memory}Gi", f"{memory * 512}Mi", "64Mi"])),
            "gpuProduct": draw(st.sampled_from([None, "NVIDIA-H100-80GB-HBM3", "NVIDIA-A100-SXM4-80GB"])),
            "tolerations": draw(st.lists(st.fixed_dictionaries(
                {"key": st.sampled_from(["dedicated", "spot"]), "effect": st.sampled_from(["NoSchedule", "NoExecute"])}),
                max_size=2)),
            "labels": draw(st.dictionaries(st.sampled_from(["team", "tier"]), DNS1123, max_size=2)),
            "rdma": {"enabled": draw(st.booleans()), "count": draw(st.integers(1, 4))},
        }

    return {
        "name": draw(st.one_of(DNS1035, YAML_LOOKALIKES)),
        "namespace": draw(st.one_of(DNS1123, YAML_LOOKALIKES, st.sampled_from(["123", "0x1f", "017"]))),
        "engine": engine,
        "sync": {"backend": "nccl" if engine == "vllm" else "gloo", "bucketMiB": draw(st.integers(1, 16384))},
        "image": {"digest": draw(st.sampled_from([None, DIGEST])),
                  "pullSecrets": draw(st.lists(DNS1123, max_size=2, unique=True))},
        "pools": {"trainer": pool(draw(st.integers(1, 16))), "inference": pool(inference_gpus)},
        "vllm": {"tensorParallelSize": tp,
                 "gpuMemoryUtilization": draw(st.floats(0.05, 1.0, allow_nan=False))},
        "model": {"hfTokenSecret": draw(st.sampled_from([None, {"name": "hf-token"}]))},
        "timeouts": {"initSeconds": draw(st.integers(1, 7200)), "healthSeconds": draw(st.integers(1, 3600))},
        "job": {"enabled": draw(st.booleans()), "submissionMode": draw(st.sampled_from(["K8sJobMode", "HTTPMode"])),
                "shutdownAfterJobFinishes": draw(st.booleans()),
                "activeDeadlineSeconds": draw(st.one_of(st.none(), st.integers(1, 10**6)))},
        "ncclEnv": {"NCCL_CUMEM_ENABLE": "0", **draw(st.dictionaries(
            st.sampled_from(["NCCL_IB_HCA", "NCCL_SOCKET_IFNAME", "NCCL_DEBUG"]), st.text("abc019_", max_size=6),
            max_size=2))},
    }


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(values=valid_values())
def test_property_valid_specs_render_their_gpus_and_validate(crds, values):
    spec = load_spec(values)
    objs = render_objects(spec)
    assert validate_objects(objs, crds) == []
    assert objs[0]["metadata"]["name"] == f"{spec.name}-config"
    assert all(o["metadata"]["namespace"] == spec.namespace for o in objs)
    assert objs[1]["metadata"]["name"] == spec.name
    c = objs[1]["spec"]["rayClusterSpec"] if spec.job.enabled else objs[1]["spec"]
    g = {x["groupName"]: x for x in c["workerGroupSpecs"]}
    for name in ("trainer", "inference"):
        pool = getattr(spec.pools, name)
        assert container(g[name])["resources"]["limits"]["nvidia.com/gpu"] == pool.gpus_per_node
        assert g[name]["replicas"] == pool.nodes
        assert g[name]["resources"] == {name: str(pool.gpus_per_node)}
    rendered_inference_gpus = g["inference"]["replicas"] * container(g["inference"])["resources"]["limits"]["nvidia.com/gpu"]
    assert spec.engines * spec.vllm.tensor_parallel_size == rendered_inference_gpus
    assert spec.world_size == 1 + rendered_inference_gpus
    assert load_spec(json.loads(objs[0]["data"]["fleet.json"])) == spec
