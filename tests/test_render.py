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
from rollfleet.render import CONFIG_PATH, render_objects, to_yaml
from rollfleet.spec import DEFAULT_ENV, PORTS, FleetSpec, load_spec
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
    assert [o["kind"] for o in objs] == ["ConfigMap", "RayJob", "NetworkPolicy"]
    job = objs[1]
    assert job["apiVersion"] == "ray.io/v1"
    assert job["spec"]["entrypoint"] == f"python -m rollfleet.runtime.launch --config {CONFIG_PATH}"
    assert set(job["spec"]["rayClusterSpec"]) >= {"rayVersion", "headGroupSpec", "workerGroupSpecs"}
    assert "upgradeStrategy" not in job["spec"]["rayClusterSpec"]


def test_job_disabled_renders_a_standalone_raycluster_with_recreate():
    objs = render_objects(load_spec({"job": {"enabled": False}}))
    assert [o["kind"] for o in objs] == ["ConfigMap", "RayCluster", "NetworkPolicy"]
    spec = objs[1]["spec"]
    assert spec["upgradeStrategy"] == {"type": "Recreate"}
    assert "entrypoint" not in spec and "rayClusterSpec" not in spec


@pytest.mark.parametrize("enabled", [True, False])
def test_name_and_namespace_on_every_object(enabled):
    objs = render_objects(load_spec({"name": "fleet-a", "namespace": "team-b", "job": {"enabled": enabled}}))
    assert [o["metadata"]["namespace"] for o in objs] == ["team-b"] * 3
    assert [o["metadata"]["name"] for o in objs] == ["fleet-a-config", "fleet-a", "fleet-a"]


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
    # the resources above are the group's, never `num-gpus`-style start params; the metrics port is explicit
    assert g["trainer"]["rayStartParams"] == g["inference"]["rayStartParams"] == {"metrics-export-port": "8080"}


def test_every_ray_node_exports_its_metrics_on_kuberays_metrics_port():
    cluster = next(o for o in render_objects(load_spec({"job": {"enabled": False}})) if o["kind"] == "RayCluster")
    head = cluster["spec"]["headGroupSpec"]["rayStartParams"]
    assert head["metrics-export-port"] == "8080" == str(PORTS["metrics"])
    assert all(g["rayStartParams"]["metrics-export-port"] == "8080" for g in cluster["spec"]["workerGroupSpecs"])


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


RESTRICTED = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def test_rdma_resource_and_ipc_lock_only_when_enabled():
    g = groups({"pools": {"trainer": {"rdma": {"enabled": True, "resourceName": "nvidia.com/hostdev", "count": 2}}}})
    tr, inf = container(g["trainer"]), container(g["inference"])
    assert tr["resources"]["limits"]["nvidia.com/hostdev"] == 2
    assert tr["securityContext"] == {"allowPrivilegeEscalation": False,
                                     "capabilities": {"drop": ["ALL"], "add": ["IPC_LOCK"]}}
    assert set(inf["resources"]["limits"]) == {"cpu", "memory", "nvidia.com/gpu"}
    assert inf["securityContext"] == RESTRICTED


def test_rdma_disabled_by_default():
    for c in all_containers({}):
        assert c["securityContext"] == RESTRICTED
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
    assert text.startswith("---\n") and text.count("\n---\n") == len(objs) - 1
    assert list(yaml.safe_load_all(text)) == objs
    assert "fleet.json: |" in text  # the runtime config stays readable


# --- templates ---------------------------------------------------------------------------------------------


def test_templates_use_strict_undefined():
    env = render._env(render.TEMPLATES)
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
        memory = draw(st.integers(2, 2048))
        return {
            "nodes": draw(st.integers(1, 4)),
            "gpusPerNode": gpus_per_node,
            "cpu": draw(st.sampled_from(["500m", "8", 96, "1.5"])),
            "memory": f"{memory}Gi",
            "shmSize": draw(st.sampled_from([f"{memory}Gi", f"{memory * 512}Mi", "1Gi"])),
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
        "sync": {"bucketMiB": draw(st.integers(1, 16384))},
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


# --- the keys platform teams need -----------------------------------------------------------------------


def pods(values: dict | None = None) -> dict[str, dict]:
    """Every pod spec: head, trainer, inference and (K8sJobMode) the submitter."""
    objs = objects(values)
    c = cluster(values)
    out = {"head": c["headGroupSpec"]["template"]["spec"],
           **{g["groupName"]: g["template"]["spec"] for g in c["workerGroupSpecs"]}}
    if "RayJob" in objs and "submitterPodTemplate" in objs["RayJob"]["spec"]:
        out["submitter"] = objs["RayJob"]["spec"]["submitterPodTemplate"]["spec"]
    return out


def test_pods_pass_pod_security_restricted_by_default():
    for name, pod in pods({}).items():
        assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 1000, "runAsGroup": 100, "fsGroup": 100,
                                          "seccompProfile": {"type": "RuntimeDefault"}}, name
        for c in pod["containers"]:
            assert c["securityContext"] == RESTRICTED, name
        assert pod["automountServiceAccountToken"] is False and "serviceAccountName" not in pod
        assert not {"hostNetwork", "hostPID", "hostIPC"} & set(pod)


def test_pod_security_values_reach_every_pod():
    values = {"podSecurity": {"runAsUser": 2000, "runAsGroup": 3000, "fsGroup": None, "seccompProfile": "Unconfined"}}
    for pod in pods(values).values():
        assert pod["securityContext"] == {"runAsNonRoot": True, "runAsUser": 2000, "runAsGroup": 3000,
                                          "seccompProfile": {"type": "Unconfined"}}


def test_service_account_and_priority_class_on_every_pod():
    for pod in pods({"serviceAccountName": "fleet", "priorityClassName": "training"}).values():
        assert pod["serviceAccountName"] == "fleet" and "automountServiceAccountToken" not in pod
        assert pod["priorityClassName"] == "training"
    assert not any("priorityClassName" in pod for pod in pods({}).values())


def test_submitter_pod_only_in_k8s_job_mode_with_the_fleets_labels():
    job = objects({"name": "sub"})["RayJob"]["spec"]
    template = job["submitterPodTemplate"]
    assert template["metadata"]["labels"]["app.kubernetes.io/instance"] == "sub"
    assert template["metadata"]["labels"]["app.kubernetes.io/component"] == "submitter"
    (c,) = template["spec"]["containers"]
    assert c["name"] == "ray-job-submitter" and "command" not in c  # KubeRay fills in `ray job submit`
    assert template["spec"]["restartPolicy"] == "Never"
    assert "submitterPodTemplate" not in objects({"job": {"submissionMode": "HTTPMode"}})["RayJob"]["spec"]


def test_affinity_reaches_only_its_pod():
    anti = {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [
        {"topologyKey": "kubernetes.io/hostname", "labelSelector": {"matchLabels": {"a": "b"}}}]}}
    p = pods({"pools": {"inference": {"affinity": anti}}})
    assert p["inference"]["affinity"] == anti
    assert "affinity" not in p["trainer"] and "affinity" not in p["head"]


def test_volumes_mount_into_their_groups():
    values = {"volumes": [{"name": "hf", "claimName": "hf-cache", "mountPath": "/hf"},
                          {"name": "ckpt", "claimName": "ckpt", "mountPath": "/ckpt", "subPath": "run",
                           "readOnly": True, "groups": ["trainer"]}]}
    p = pods(values)
    assert {"name": "hf", "persistentVolumeClaim": {"claimName": "hf-cache"}} in p["head"]["volumes"]
    assert {"name": "ckpt", "persistentVolumeClaim": {"claimName": "ckpt"}} in p["trainer"]["volumes"]
    assert not any(v["name"] == "ckpt" for v in p["inference"]["volumes"] + p["head"]["volumes"])
    (trainer,) = p["trainer"]["containers"]
    assert {"name": "ckpt", "mountPath": "/ckpt", "readOnly": True, "subPath": "run"} in trainer["volumeMounts"]
    assert {"name": "hf", "mountPath": "/hf"} in trainer["volumeMounts"]
    assert "volumes" not in p.get("submitter", {})
    colocated = pods({**values, "pools": {"colocated": {"nodes": 1, "gpusPerNode": 2}},
                      "vllm": {"gpuMemoryUtilization": 0.5}, "rollout": {"maxStaleness": 0}})
    assert {v["name"] for v in colocated["colocated"]["volumes"]} >= {"hf", "ckpt"}  # a trainer's volume too
    assert not any(v["name"] == "ckpt" for v in colocated["head"]["volumes"])


def test_ephemeral_storage_is_a_request():
    res = container(groups({"pools": {"trainer": {"ephemeralStorage": "200Gi"}}})["trainer"])["resources"]
    assert res["requests"]["ephemeral-storage"] == "200Gi" and "ephemeral-storage" not in res["limits"]
    assert container(head({"head": {"ephemeralStorage": 10**10}}))["resources"]["requests"]["ephemeral-storage"] == \
        str(10**10)
    assert "ephemeral-storage" not in container(head({}))["resources"]["requests"]


def test_secret_env_by_reference_on_every_container():
    values = {"secretEnv": {"WANDB_API_KEY": {"name": "wandb", "key": "api-key"}, "A_TOKEN": {"name": "a"}}}
    for c in all_containers(values):
        env = env_of(c)
        assert env["WANDB_API_KEY"] == {"name": "WANDB_API_KEY",
                                        "valueFrom": {"secretKeyRef": {"name": "wandb", "key": "api-key"}}}
        assert env["A_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "a", "key": "token"}
    assert "api-key" not in render_objects(load_spec(values))[0]["data"]["fleet.json"].split("secretEnv")[0]


@pytest.mark.parametrize(("gang", "want"), [
    ({"scheduler": "kueue", "queue": "team-a"}, {"kueue.x-k8s.io/queue-name": "team-a"}),
    ({"scheduler": "volcano", "queue": "rl"}, {"ray.io/scheduler-name": "volcano", "volcano.sh/queue-name": "rl",
                                               "ray.io/priority-class-name": "high"}),
    ({"scheduler": "yunikorn", "queue": "root.rl"}, {"ray.io/scheduler-name": "yunikorn",
                                                     "ray.io/gang-scheduling-enabled": "true",
                                                     "yunikorn.apache.org/app-id": "gang",
                                                     "yunikorn.apache.org/queue": "root.rl"}),
])
@pytest.mark.parametrize("enabled", [True, False])
def test_gang_scheduling_labels_the_top_level_object(gang, want, enabled):
    values = {"name": "gang", "gangScheduling": gang, "priorityClassName": "high", "job": {"enabled": enabled}}
    top = objects(values)["RayJob" if enabled else "RayCluster"]
    assert want.items() <= top["metadata"]["labels"].items()
    for g in cluster(values)["workerGroupSpecs"]:  # the group's minimum is the whole pool
        assert g["minReplicas"] == g["replicas"] == g["maxReplicas"]


def test_ray_auth_token_where_the_ray_version_supports_it():
    assert cluster({})["authOptions"] == {"mode": "token"}
    assert cluster({"rayAuth": {"secretName": "tok"}})["authOptions"] == {"mode": "token", "secretName": "tok"}
    assert "authOptions" not in cluster({"rayVersion": "2.10.0"})
    assert "authOptions" not in cluster({"rayAuth": {"mode": "disabled"}})


def test_network_policy_opens_the_fleet_to_itself_and_the_operator_only():
    policy = objects({"name": "np", "namespace": "rl"})["NetworkPolicy"]
    fleet = {"app.kubernetes.io/name": "rollfleet", "app.kubernetes.io/instance": "np"}
    assert policy["spec"]["podSelector"] == {"matchLabels": fleet}
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    own, operator = policy["spec"]["ingress"]
    assert own == {"from": [{"podSelector": {"matchLabels": fleet}}]}  # no ports: NCCL's are ephemeral
    assert operator["ports"] == [{"port": 8265, "protocol": "TCP"}]
    selector = operator["from"][0]["podSelector"]["matchLabels"]
    for pod_labels in OPERATOR_POD_LABELS.values():
        assert selector.items() <= pod_labels.items()


# The KubeRay v1.7.0 operator's pod labels: its Helm chart (a nameOverride changes `name`) and its
# kustomize manifests (ray-operator/config/manager)
OPERATOR_POD_LABELS = {
    "helm": {"app.kubernetes.io/name": "kuberay-operator", "app.kubernetes.io/instance": "kuberay-operator",
             "app.kubernetes.io/component": "kuberay-operator"},
    "kustomize": {"app.kubernetes.io/name": "kuberay", "app.kubernetes.io/component": "kuberay-operator"},
}


def test_network_policy_ingress_from_named_namespaces():
    policy = objects({"networkPolicy": {"operatorNamespace": "kuberay-system", "ingress": [
        {"namespace": "monitoring", "ports": ["metrics"]}, {"namespace": "ci", "ports": ["dashboard", "client"]}]}})
    _, operator, monitoring, ci = policy["NetworkPolicy"]["spec"]["ingress"]
    assert operator["from"][0]["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}}
    assert monitoring == {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}],
                          "ports": [{"port": 8080, "protocol": "TCP"}]}
    assert [p["port"] for p in ci["ports"]] == [8265, 10001]
    assert "NetworkPolicy" not in objects({"networkPolicy": {"enabled": False}})


def test_the_scraper_alone_reaches_the_metrics_port_on_every_pod():
    objs = objects({"name": "mon", "monitoring": {"podMonitor": {"enabled": True},
                                                  "scraper": {"namespace": "obs", "podLabels": {"app": "prom"}}}})
    scraper = objs["NetworkPolicy"]["spec"]["ingress"][2]
    assert scraper == {"from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "obs"}},
                                 "podSelector": {"matchLabels": {"app": "prom"}}}],  # one peer: both must match
                       "ports": [{"port": 8080, "protocol": "TCP"}]}
    monitor = objs["PodMonitor"]["spec"]
    assert monitor["selector"]["matchLabels"] == objs["NetworkPolicy"]["spec"]["podSelector"]["matchLabels"]
    assert monitor["namespaceSelector"] == {"matchNames": ["default"]}
    (endpoint,) = monitor["podMetricsEndpoints"]
    spec = objs["RayJob"]["spec"]["rayClusterSpec"]
    for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
        (container,) = group["template"]["spec"]["containers"]
        assert {"name": endpoint["port"], "containerPort": 8080, "protocol": "TCP"} in container["ports"]
        assert group["rayStartParams"]["metrics-export-port"] == "8080"


def test_the_alerts_are_this_fleets_with_the_values_thresholds():
    rules = objects({"name": "mon", "rollout": {"maxStaleness": 2}, "monitoring": {"alerts": {
        "enabled": True, "restarts": 5, "noStepMinutes": 12, "pushSeconds": 40}}})["PrometheusRule"]
    exprs = {r["alert"]: r["expr"] for r in rules["spec"]["groups"][0]["rules"]}
    assert all('{fleet="mon"' in e for e in exprs.values()), exprs
    assert exprs["RollfleetEngineRestarting"].endswith("[1h])) >= 5")
    assert exprs["RollfleetNoStep"].endswith("> 720")
    assert exprs["RollfleetPushSlow"].endswith("> 40")
    assert exprs["RollfleetStalenessAtBound"].endswith(">= 1.5")  # mean staleness: most samples at 2


def test_monitoring_objects_only_when_enabled():
    kinds = set(objects({}))
    assert not kinds & {"PodMonitor", "PrometheusRule"} and len(render_objects(load_spec({}))) == 3


# --- template injection: every string reaches the objects as data --------------------------------------

# newlines, ': ', '{{', quotes, '#', and YAML words, combined into a few strings
ADVERSARIAL = ["x\nhostNetwork: true\nimage: evil", "a: b # c - d", "{{ 7 * 7 }}{% raw %}}{&a *b",
               "'\"q\"\\", "null"]


def _string_fields(model, prefix=()):
    """(path, kind) of every string-carrying field of the spec: str, list[str], dict keys and values."""
    import typing

    from pydantic import BaseModel

    for name, field in model.model_fields.items():
        path = (*prefix, name)
        ann = field.annotation
        args = [a for a in (ann, *typing.get_args(ann)) if a is not type(None)]
        if typing.get_origin(ann) is list:
            args = [ann]
        items = [typing.get_args(a)[0] for a in args if typing.get_origin(a) is list]
        models = [a for a in args if isinstance(a, type) and issubclass(a, BaseModel)]
        item_models = [a for a in items if isinstance(a, type) and issubclass(a, BaseModel)]
        if "dict[" in str(ann):
            yield path, "map"
        elif models or item_models:
            yield from _string_fields((models or item_models)[0], path if models else (*path, 0))
        elif "list[" in str(ann):
            if items and _is_str(items[0]):
                yield path, "list"
        elif any(_is_str(a) for a in args):
            yield path, "str"


def _is_str(annotation) -> bool:
    """str, a Literal of strings, or an Annotated str (str | int for quantities)."""
    import typing

    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    # a Literal is an enum: it carries no user text once validated, and its value steers the templates
    return annotation is str or str in typing.get_args(annotation)


def _with(spec, path, value):
    """`spec` with the field at `path` (attribute names) replaced, without validation."""
    head, rest = path[0], path[1:]
    if isinstance(head, int):  # an item of a list of models
        return [_with(spec[head], rest, value), *spec[head + 1:]]
    if not rest:
        return spec.model_copy(update={head: value})
    return spec.model_copy(update={head: _with(getattr(spec, head), rest, value)})


def _paths(obj, prefix=""):
    if isinstance(obj, dict):
        return {p for k, v in obj.items() for p in _paths(v, f"{prefix}/{k}")} | {prefix}
    if isinstance(obj, list):
        return {p for i, v in enumerate(obj) for p in _paths(v, f"{prefix}/{i}")} | {prefix}
    return {prefix}


# (pools.colocated is a Pool like trainer and inference, rendered by the same worker-group template)
STRING_FIELDS = [f for f in _string_fields(FleetSpec) if f[0][:2] != ("pools", "colocated")]
TOLERATIONS = [{"key": "k", "operator": "Equal", "value": "v", "effect": "NoSchedule"}]
_REQ = [{"key": "k", "operator": "In", "values": ["v"]}]
_SELECTOR = {"match_labels": {"a": "b"}, "match_expressions": _REQ}
_TERM = {"topology_key": "t", "namespaces": ["n"], "label_selector": _SELECTOR, "namespace_selector": _SELECTOR,
         "match_label_keys": ["k"], "mismatch_label_keys": ["m"]}
_POD = {"required_during_scheduling_ignored_during_execution": [_TERM],
        "preferred_during_scheduling_ignored_during_execution": [{"weight": 1, "pod_affinity_term": _TERM}]}
AFFINITY = {"node_affinity": {
    "required_during_scheduling_ignored_during_execution": {"node_selector_terms": [
        {"match_expressions": _REQ, "match_fields": _REQ}]},
    "preferred_during_scheduling_ignored_during_execution": [
        {"weight": 1, "preference": {"match_expressions": _REQ, "match_fields": _REQ}}]},
    "pod_affinity": _POD, "pod_anti_affinity": _POD}
BASE = FleetSpec(job={"entrypoint": "pkg.mod:main"},
                 head={"tolerations": TOLERATIONS, "affinity": AFFINITY},
                 pools={"trainer": {"rdma": {"enabled": True}, "tolerations": TOLERATIONS, "affinity": AFFINITY},
                        "inference": {"tolerations": TOLERATIONS, "affinity": AFFINITY}},
                 volumes=[{"name": "v", "claim_name": "c", "mount_path": "/m", "sub_path": "s"}],
                 network_policy={"operator_namespace": "op", "ingress": [{"namespace": "n", "ports": ["metrics"]}]},
                 model={"revision": "main", "hfTokenSecret": {"name": "hf"}}, priority_class_name="p",
                 service_account_name="sa", ray_auth={"secret_name": "tok"},
                 gang_scheduling={"scheduler": "volcano", "queue": "q"})


def test_every_string_field_is_covered():
    paths = {".".join(map(str, p)) for p, _ in STRING_FIELDS}
    assert {"name", "namespace", "image.repository", "image.tag", "pools.trainer.rdma.resource_name",
            "pools.inference.labels", "env", "model.name", "job.entrypoint", "gang_scheduling.queue"} <= paths
    assert len(paths) >= 40


def _shape(text: str) -> set[str]:
    """The object paths of a render with every string field set to `text` (`text` itself masked)."""
    spec = BASE
    for path, kind in STRING_FIELDS:
        value = {"str": text, "list": [text], "map": {text: text}}[kind]
        if path[-1] == "secret_env":
            value = {text: {"name": text, "key": text}}
        spec = _with(spec, path, value)
    return {p.replace(text, "<s>") for o in render_objects(spec) for p in _paths(o)}


@pytest.mark.filterwarnings("ignore::UserWarning")  # the spec is built without validation on purpose
@pytest.mark.parametrize("bad", ADVERSARIAL)
def test_adversarial_strings_never_change_the_shape_of_the_objects(bad):
    """Every string field at once, in a spec built without validation (model_copy), so the templates alone
    are tested: a value with YAML or template syntax in it stays one string where a benign one would be."""
    want, got = _shape("benign"), _shape(bad)
    assert got == want, f"paths only with {bad!r}: {sorted(got - want)[:10]}; missing: {sorted(want - got)[:10]}"


RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "persistentVolumeClaim", "projected",
                      "secret"}


def restricted_violations(pod: dict) -> list[str]:
    """What in a pod spec Pod Security "restricted" (Kubernetes v1.33) refuses."""
    out = [f"spec.{k}" for k in ("hostNetwork", "hostPID", "hostIPC") if pod.get(k)]
    sec = pod.get("securityContext", {})
    out += [f"volume {v['name']}" for v in pod.get("volumes", []) if not set(v) - {"name"} <= RESTRICTED_VOLUMES]
    for c in pod["containers"]:
        csec = c.get("securityContext", {})
        if not (csec.get("runAsNonRoot") or sec.get("runAsNonRoot")):
            out.append(f"{c['name']}: runAsNonRoot")
        if (csec.get("seccompProfile") or sec.get("seccompProfile", {})).get("type") not in ("RuntimeDefault", "Localhost"):
            out.append(f"{c['name']}: seccompProfile")
        if csec.get("allowPrivilegeEscalation") is not False:
            out.append(f"{c['name']}: allowPrivilegeEscalation")
        caps = csec.get("capabilities", {})
        if "ALL" not in caps.get("drop", []) or set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            out.append(f"{c['name']}: capabilities")
        if c.get("ports") and any(p.get("hostPort") for p in c["ports"]):
            out.append(f"{c['name']}: hostPort")
    return out


@pytest.mark.parametrize("example", ["restricted-kueue", "one-node-8gpu", "kind"])
def test_examples_without_rdma_pass_pod_security_restricted(example):
    from rollfleet.values import load_values

    from conftest import ROOT

    spec = load_values(ROOT / "manifests" / "examples" / f"{example}.yaml")
    problems = {name: restricted_violations(pod) for name, pod in pods(spec.model_dump(by_alias=True)).items()}
    assert problems == {name: [] for name in problems}


def test_rdma_is_outside_restricted_only_by_ipc_lock():
    p = pods({"pools": {"trainer": {"rdma": {"enabled": True}}}})
    assert restricted_violations(p["trainer"]) == ["ray-worker: capabilities"]
    assert restricted_violations(p["inference"]) == []
