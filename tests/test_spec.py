"""spec.py (and the field types of fields.py, pod.py): the values model, its rules, one line per problem."""

from __future__ import annotations

import json
from decimal import Decimal

import jsonschema
import pytest
import yaml
from pydantic import ValidationError

from conftest import EXAMPLES
from invalid_values import INVALID as ISSUE_CASES
from rollfleet.values import merge_default_maps
from rollfleet.spec import (
    DEFAULT_ENV,
    DEFAULT_NCCL_ENV,
    RAY_VERSION,
    FleetSpec,
    SpecError,
    cross_field_problems,
    json_schema,
    load_spec,
    parse_quantity,
    runtime_config,
)

DIGEST = "sha256:" + "ab" * 32


def problems_of(values) -> list[str]:
    with pytest.raises(SpecError) as info:
        load_spec(values)
    return info.value.problems


# (id, values, the field path the single problem line must start with, a fragment of its message)
INVALID = [
    # tensor parallelism vs the inference pool
    ("tp-does-not-divide", {"vllm": {"tensorParallelSize": 3}, "pools": {"inference": {"gpusPerNode": 4}}},
     "vllm.tensorParallelSize", "does not divide pools.inference.gpusPerNode 4"),
    ("tp-does-not-divide-6-4", {"vllm": {"tensorParallelSize": 4}, "pools": {"inference": {"gpusPerNode": 6}}},
     "vllm.tensorParallelSize", "choose a divisor"),
    ("tp-spans-nodes", {"vllm": {"tensorParallelSize": 8}, "pools": {"inference": {"gpusPerNode": 4}}},
     "vllm.tensorParallelSize", "never spans nodes"),
    ("tp-zero", {"vllm": {"tensorParallelSize": 0}}, "vllm.tensorParallelSize", "greater than or equal to 1"),
    # gpuMemoryUtilization in (0, 1]
    ("gmu-zero", {"vllm": {"gpuMemoryUtilization": 0}}, "vllm.gpuMemoryUtilization", "outside (0, 1]"),
    ("gmu-negative", {"vllm": {"gpuMemoryUtilization": -0.5}}, "vllm.gpuMemoryUtilization", "outside (0, 1]"),
    ("gmu-above-one", {"vllm": {"gpuMemoryUtilization": 1.01}}, "vllm.gpuMemoryUtilization", "outside (0, 1]"),
    ("gmu-percent", {"vllm": {"gpuMemoryUtilization": 90}}, "vllm.gpuMemoryUtilization", "use e.g. 0.9"),
    ("gmu-not-a-number", {"vllm": {"gpuMemoryUtilization": "most"}}, "vllm.gpuMemoryUtilization", "valid number"),
    # prefix caching needs the V1 engine
    ("prefix-caching-v0", {"env": {**DEFAULT_ENV, "VLLM_USE_V1": "0"}},
     "vllm.enablePrefixCaching", "enablePrefixCaching: false"),
    # names: KubeRay wants DNS-1035 for the RayJob/RayCluster name, namespaces are DNS-1123 labels
    ("name-uppercase", {"name": "GRPO"}, "name", "DNS-1035"),
    ("name-underscore", {"name": "grpo_8gpu"}, "name", "DNS-1035"),
    ("name-leading-digit", {"name": "8gpu"}, "name", "start with a lowercase letter"),
    ("name-trailing-dash", {"name": "grpo-"}, "name", "DNS-1035"),
    ("name-too-long", {"name": "a" * 41}, "name", "at most 40 characters"),
    ("name-empty", {"name": ""}, "name", "DNS-1035"),
    ("namespace-uppercase", {"namespace": "RL"}, "namespace", "DNS-1123"),
    ("namespace-dot", {"namespace": "team.rl"}, "namespace", "DNS-1123"),
    ("namespace-too-long", {"namespace": "n" * 64}, "namespace", "at most 63 characters"),
    # /dev/shm counts against pod memory
    ("shm-exceeds-memory-trainer", {"pools": {"trainer": {"memory": "32Gi", "shmSize": "64Gi"}}},
     "pools.trainer.shmSize", "exceeds pools.trainer.memory 32Gi"),
    ("shm-exceeds-memory-inference-units", {"pools": {"inference": {"memory": "1G", "shmSize": "1Gi"}}},
     "pools.inference.shmSize", "lower shmSize or raise memory"),
    # both pools need GPUs
    ("inference-no-gpus", {"pools": {"inference": {"gpusPerNode": 0}}},
     "pools.inference.gpusPerNode", "greater than or equal to 1"),
    ("gpus-per-node-17", {"pools": {"inference": {"gpusPerNode": 17}}},
     "pools.inference.gpusPerNode", "less than or equal to 16"),
    ("nodes-zero", {"pools": {"trainer": {"nodes": 0}}}, "pools.trainer.nodes", "greater than or equal to 1"),
    # unknown keys, with a suggestion
    ("unknown-top-level", {"pool": {}}, "pool", "did you mean 'pools'?"),
    ("unknown-top-level-case", {"rayversion": "2.52.1"}, "rayversion", "did you mean 'rayVersion'?"),
    ("unknown-nested", {"pools": {"inference": {"gpusPerNod": 8}}},
     "pools.inference.gpusPerNod", "did you mean 'pools.inference.gpusPerNode'?"),
    ("unknown-deep", {"pools": {"trainer": {"rdma": {"enable": True}}}},
     "pools.trainer.rdma.enable", "did you mean 'pools.trainer.rdma.enabled'?"),
    ("unknown-in-list", {"pools": {"trainer": {"tolerations": [{"keyy": "dedicated"}]}}},
     "pools.trainer.tolerations[0].keyy", "did you mean 'pools.trainer.tolerations[0].key'?"),
    ("unknown-bucket-case", {"sync": {"bucketMib": 512}}, "sync.bucketMib", "did you mean 'sync.bucketMiB'?"),
    ("unknown-no-close-match", {"sync": {"zzzzzz": 1}}, "sync.zzzzzz", "known keys here: bucketMiB, timeoutSeconds"),
    ("misspelt-required-key", {"model": {"hfTokenSecret": {"nam": "hf-token"}}},
     "model.hfTokenSecret.nam", "did you mean 'model.hfTokenSecret.name'?"),
    ("missing-required-key", {"model": {"hfTokenSecret": {"key": "token"}}},
     "model.hfTokenSecret.name", "Field required"),
    # Ray versions whose probes hang under KubeRay, and malformed ones
    ("ray-2.11", {"rayVersion": "2.11.0"}, "rayVersion", "in 2.11–2.37"),
    ("ray-2.24", {"rayVersion": "2.24.0"}, "rayVersion", "in 2.11–2.37"),
    ("ray-2.37", {"rayVersion": "2.37.9"}, "rayVersion", f"use {RAY_VERSION}"),
    ("ray-not-semver", {"rayVersion": "latest"}, "rayVersion", "not MAJOR.MINOR.PATCH"),
    ("ray-two-parts", {"rayVersion": "2.52"}, "rayVersion", "not MAJOR.MINOR.PATCH"),
    # the CPU stand-in has no tensor parallelism
    ("cpu-standin-with-tp", {"engine": "cpu-standin", "vllm": {"tensorParallelSize": 2}},
     "vllm.tensorParallelSize", "set it to 1"),
    ("unknown-engine", {"engine": "sglang"}, "engine", "'vllm' or 'cpu-standin'"),
    # submission modes
    ("sidecar-mode", {"job": {"submissionMode": "SidecarMode"}}, "job.submissionMode", "kuberay#4945"),
    ("unknown-submission-mode", {"job": {"submissionMode": "InteractiveMode"}}, "job.submissionMode", "K8sJobMode"),
    # environment
    ("nccl-var-in-env", {"env": {**DEFAULT_ENV, "NCCL_IB_HCA": "mlx5"}}, "env.NCCL_IB_HCA", "move it there"),
    ("non-nccl-in-ncclenv", {"ncclEnv": {**DEFAULT_NCCL_ENV, "GLOO_SOCKET_IFNAME": "eth0"}},
     "ncclEnv.GLOO_SOCKET_IFNAME", "only NCCL_* variables"),
    ("hf-token-in-env", {"env": {**DEFAULT_ENV, "HF_TOKEN": "hf_abc"}}, "env.HF_TOKEN", "model.hfTokenSecret"),
    ("bad-env-name", {"env": {"1BAD": "x"}}, "env.1BAD", "not a valid environment variable name"),
    ("env-value-not-string", {"env": {"VLLM_USE_V1": 1}}, "env.VLLM_USE_V1", "valid string; write it in quotes"),
    # quantities
    ("memory-gb-suffix", {"pools": {"trainer": {"memory": "64GB"}}}, "pools.trainer.memory", "size in bytes"),
    ("cpu-word", {"head": {"cpu": "two"}}, "head.cpu", "Kubernetes quantity"),
    ("cpu-negative", {"pools": {"inference": {"cpu": "-4"}}}, "pools.inference.cpu", "Kubernetes quantity"),
    ("shm-float", {"pools": {"inference": {"shmSize": 1.5}}}, "pools.inference.shmSize", "quote it"),
    ("memory-bool", {"head": {"memory": True}}, "head.memory", "Kubernetes quantity"),
    ("memory-list", {"pools": {"trainer": {"memory": ["64Gi"]}}}, "pools.trainer.memory", "Kubernetes quantity"),
    # image
    ("digest-short", {"image": {"digest": "sha256:abc"}}, "image.digest", "sha256"),
    ("digest-uppercase", {"image": {"digest": "sha256:" + "AB" * 32}}, "image.digest", "sha256"),
    ("digest-no-algorithm", {"image": {"digest": "ab" * 32}}, "image.digest", "sha256"),
    ("pull-policy", {"image": {"pullPolicy": "Sometimes"}}, "image.pullPolicy", "IfNotPresent"),
    # trainer entrypoint is module:function
    ("entrypoint-no-function", {"job": {"entrypoint": "my_trainer.main"}}, "job.entrypoint", "module:function"),
    ("entrypoint-shell", {"job": {"entrypoint": "python train.py"}}, "job.entrypoint", "module:function"),
    ("entrypoint-two-colons", {"job": {"entrypoint": "a:b:c"}}, "job.entrypoint", "module:function"),
    # other bounded fields
    ("bucket-zero", {"sync": {"bucketMiB": 0}}, "sync.bucketMiB", "greater than or equal to 1"),
    ("init-timeout-zero", {"timeouts": {"initSeconds": 0}}, "timeouts.initSeconds", "greater than or equal to 1"),
    ("toleration-operator", {"pools": {"trainer": {"tolerations": [{"operator": "Sometimes"}]}}},
     "pools.trainer.tolerations[0].operator", "Exists"),
    ("pools-not-mapping", {"pools": 3}, "pools", "valid dictionary"),
    ("max-model-len-tiny", {"model": {"maxModelLen": 8}}, "model.maxModelLen", "greater than or equal to 16"),
]


ALL_INVALID = INVALID + ISSUE_CASES


@pytest.mark.parametrize(("values", "path", "fragment"), [c[1:] for c in ALL_INVALID],
                         ids=[c[0] for c in ALL_INVALID])
def test_invalid_spec_is_one_line_naming_the_field(values, path, fragment):
    problems = problems_of(merge_default_maps(values))  # as a values file is read (env, ncclEnv merged)
    assert len(problems) == 1, problems
    (line,) = problems
    assert "\n" not in line
    assert line.startswith(f"{path}: "), line
    assert fragment in line, line


def test_enough_distinct_invalid_specs():
    ids = [c[0] for c in ALL_INVALID]
    assert len(set(ids)) == len(ids) >= 140


def test_several_problems_give_one_line_each_in_the_error_text():
    """Field problems and cross-field problems of the same file, in one run."""
    values = {"name": "Bad", "vllm": {"tensorParallelSize": 3}, "job": {"submissionMode": "SidecarMode"},
              "env": {**DEFAULT_ENV, "HF_TOKEN": "x"}}
    with pytest.raises(SpecError) as info:
        load_spec(values)
    lines = str(info.value).splitlines()
    assert lines == info.value.problems
    assert [line.split(":")[0] for line in lines] == [
        "name", "job.submissionMode", "env.HF_TOKEN", "vllm.tensorParallelSize"]


def test_a_cross_field_problem_about_a_field_in_error_is_not_reported_twice():
    # memory is malformed: "shmSize exceeds memory" would compare against the default and mislead
    problems = problems_of({"pools": {"trainer": {"memory": "lots", "shmSize": "300Gi"}}})
    assert [p.split(":")[0] for p in problems] == ["pools.trainer.memory"]


def test_field_errors_in_several_places_each_name_their_path():
    problems = problems_of({"pools": {"trainer": {"memory": "lots"}, "inference": {"gpusPerNod": 2}},
                            "image": {"digest": "x"}})
    assert sorted(p.split(":")[0] for p in problems) == [
        "image.digest", "pools.inference.gpusPerNod", "pools.trainer.memory"]


@pytest.mark.parametrize("version", ["2.10.0", "2.38.0", RAY_VERSION, "3.0.0", "1.13.1"])
def test_ray_versions_outside_the_hanging_range_are_accepted(version):
    assert load_spec({"rayVersion": version}).ray_version == version


@pytest.mark.parametrize("values", [
    pytest.param({"name": "a" * 40}, id="name-40-chars"),
    pytest.param({"name": "a"}, id="name-one-letter"),
    pytest.param({"namespace": "n" * 63}, id="namespace-63-chars"),
    pytest.param({"namespace": "123"}, id="namespace-digits"),
    pytest.param({"vllm": {"gpuMemoryUtilization": 1.0}}, id="gmu-one"),
    pytest.param({"vllm": {"tensorParallelSize": 4}}, id="tp-equals-gpus-per-node"),
    pytest.param({"vllm": {"tensorParallelSize": 2}, "pools": {"inference": {"gpusPerNode": 6}}}, id="tp-divides"),
    pytest.param({"vllm": {"enablePrefixCaching": False}, "env": {"VLLM_USE_V1": "0"}}, id="v0-without-prefix"),
    pytest.param({"pools": {"trainer": {"memory": "1Gi", "shmSize": "1024Mi"}}}, id="shm-equals-memory"),
    pytest.param({"pools": {"trainer": {"memory": 2**31, "shmSize": str(2**30)}}}, id="integer-quantity"),
    pytest.param({"engine": "cpu-standin"}, id="cpu-standin"),
    pytest.param({"pools": {"trainer": {"shmSize": "1Gi", "memory": "1Gi"}}}, id="shm-minimum"),
    pytest.param({"pools": {"trainer": {"annotations": {"a": "x" * 262143}}}}, id="annotations-at-the-limit"),
    pytest.param({"image": {"repository": "localhost:5000/a/b__c", "tag": "v1.2.3-rc_1"}}, id="image-reference"),
    pytest.param({"pools": {"trainer": {"nodes": 2.0}}}, id="integral-float"),
    pytest.param({"pools": {"trainer": {"tolerations": [{"key": "a", "operator": "Equal", "value": ""},
                                                          {"operator": "Exists"}]}}}, id="tolerations"),
    pytest.param({"vllm": {"extraEngineArgs": {"kv_cache_dtype": "fp8", "load_format": "dummy"}}}, id="engine-args"),
    pytest.param({"env": {"TOKENIZERS_PARALLELISM": "false", "KEYBOARD": "x"}}, id="env-not-credentials"),
    pytest.param({"global": {"anything": [1, {"goes": True}]}}, id="helm-global"),
    pytest.param({"job": {"submissionMode": "HTTPMode"}}, id="http-mode"),
    pytest.param({"job": {"entrypoint": "my_pkg.train:main"}}, id="entrypoint"),
    pytest.param({"image": {"digest": DIGEST}}, id="digest"),
    pytest.param({"env": {}, "ncclEnv": {"NCCL_CUMEM_ENABLE": "0"}}, id="empty-env"),
])
def test_valid_edges_are_accepted(values):
    spec = load_spec(values)
    assert cross_field_problems(spec) == []


def test_defaults():
    spec = load_spec({})
    assert spec == load_spec(None) == FleetSpec()
    assert spec.vllm.gpu_memory_utilization == 0.9
    assert spec.vllm.enable_prefix_caching is True
    assert spec.vllm.tensor_parallel_size == 1
    assert spec.timeouts.init_seconds == 1200
    assert spec.timeouts.health_seconds == 600
    assert spec.env == DEFAULT_ENV
    assert spec.env["VLLM_USE_V1"] == "1"
    assert spec.env["VLLM_ALLOW_INSECURE_SERIALIZATION"] == "1"
    assert spec.nccl_env == {"NCCL_CUMEM_ENABLE": "0"}
    assert spec.ray_version == RAY_VERSION
    assert spec.engine == "vllm" and spec.sync_backend == "nccl"
    assert load_spec({"engine": "cpu-standin"}).sync_backend == "gloo"
    assert spec.sync.bucket_mib == 1024
    assert spec.job.enabled is True and spec.job.submission_mode == "K8sJobMode"
    assert spec.model.hf_token_secret is None
    assert spec.image.digest is None and spec.image.ref.endswith(f":{spec.image.tag}")


def test_default_env_is_not_shared_between_specs():
    a, b = FleetSpec(), FleetSpec()
    assert a.env == b.env and a.env is not DEFAULT_ENV and a.nccl_env is not DEFAULT_NCCL_ENV


def test_spec_is_frozen():
    spec = load_spec({})
    with pytest.raises(ValidationError, match="frozen"):
        spec.name = "other"


@pytest.mark.parametrize(("nodes", "gpus_per_node", "tp", "engines"), [
    (1, 4, 1, 4), (1, 8, 2, 4), (2, 8, 2, 8), (3, 6, 3, 6), (2, 8, 8, 2), (1, 1, 1, 1),
])
def test_engines_and_world_size_are_derived(nodes, gpus_per_node, tp, engines):
    spec = load_spec({"pools": {"inference": {"nodes": nodes, "gpusPerNode": gpus_per_node}},
                      "vllm": {"tensorParallelSize": tp}})
    assert spec.engines == engines
    assert spec.engines * tp == spec.pools.inference.gpus == nodes * gpus_per_node
    assert spec.world_size == 1 + nodes * gpus_per_node


@pytest.mark.parametrize(("text", "value"), [
    ("8", Decimal(8)), (8, Decimal(8)), ("500m", Decimal("0.5")), ("0.5", Decimal("0.5")),
    ("1k", Decimal(1000)), ("64Mi", Decimal(64 * 2**20)), ("64Gi", Decimal(64 * 2**30)),
    ("1G", Decimal(10**9)), ("1.5Gi", Decimal(3 * 2**29)), ("2Ti", Decimal(2 * 2**40)),
])
def test_quantities_parse(text, value):
    assert parse_quantity(text) == value


@pytest.mark.parametrize("text", ["64GB", "", "1.5.1", "-1", "Gi", "1 Gi"])
def test_bad_quantities_do_not_parse(text):
    with pytest.raises(ValueError):
        parse_quantity(text)


def test_quantity_patterns_refuse_a_trailing_newline():
    with pytest.raises(ValueError):
        parse_quantity("64Gi\n")


def test_integer_quantities_are_kept_as_strings():
    spec = load_spec({"pools": {"trainer": {"cpu": 48}}})
    assert spec.pools.trainer.cpu == "48"


def _full_values() -> dict:
    return {
        "name": "full", "namespace": "team-rl",
        "image": {"digest": DIGEST, "pullSecrets": ["creds"], "pullPolicy": "Always"},
        "head": {"nodeSelector": {"pool": "cpu"}, "tolerations": [{"key": "cpu-only", "effect": "NoSchedule"}]},
        "pools": {"trainer": {"nodes": 2, "gpusPerNode": 8, "cpu": 96, "memory": "960Gi", "shmSize": "128Gi",
                              "rdma": {"enabled": True, "count": 2}, "gpuProduct": None,
                              "tolerations": [{"key": "d", "operator": "Equal", "value": "x", "effect": "NoExecute"}]},
                  "inference": {"gpusPerNode": 8, "labels": {"team": "rl"}, "annotations": {"a": "b"}}},
        "model": {"name": "Qwen/Qwen2.5-0.5B", "revision": "main", "hfTokenSecret": {"name": "hf"}},
        "vllm": {"tensorParallelSize": 2, "gpuMemoryUtilization": 0.85, "maxNumSeqs": 64,
                 "extraEngineArgs": {"kv_cache_dtype": "fp8", "limit_mm_per_prompt": {"image": 0}}},
        "sync": {"bucketMiB": 2048, "verifyChecksums": False},
        "timeouts": {"initSeconds": 300, "healthSeconds": 45},
        "job": {"entrypoint": "my_pkg.train:main", "steps": 7, "submissionMode": "HTTPMode",
                "activeDeadlineSeconds": 3600, "shutdownAfterJobFinishes": False},
        "ncclEnv": {"NCCL_CUMEM_ENABLE": "0", "NCCL_IB_HCA": "mlx5"},
        "env": {"VLLM_USE_V1": "1", "HF_HOME": "/cache"},
    }


@pytest.mark.parametrize("values", [
    pytest.param({}, id="defaults"),
    pytest.param(_full_values(), id="every-field"),
    *[pytest.param(yaml.safe_load(e.read_text()), id=e.stem) for e in EXAMPLES],
])
def test_runtime_config_round_trips(values):
    spec = load_spec(values)
    config = runtime_config(spec)
    again = load_spec(json.loads(json.dumps(config)))
    assert again == spec
    assert runtime_config(again) == config


def test_runtime_config_uses_camel_case():
    config = runtime_config(load_spec({}))
    assert "gpusPerNode" in config["pools"]["inference"]
    assert "bucketMiB" in config["sync"]
    assert "rayVersion" in config and "ray_version" not in config


def test_json_schema_is_camel_case_and_closed():
    schema = json_schema()
    text = json.dumps(schema)
    assert '"gpusPerNode"' in text and '"bucketMiB"' in text and '"tensorParallelSize"' in text
    assert "gpus_per_node" not in text and "bucket_mib" not in text
    assert schema["additionalProperties"] is False


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda e: e.stem)
def test_examples_satisfy_the_json_schema(example):
    # the chart's values.schema.json must accept what the model accepts
    jsonschema.Draft7Validator(json_schema()).validate(yaml.safe_load(example.read_text()))


def test_json_schema_rejects_a_misspelt_key():
    errors = list(jsonschema.Draft7Validator(json_schema()).iter_errors({"pools": {"inference": {"gpusPerNod": 8}}}))
    assert errors and list(errors[0].absolute_path) == ["pools", "inference"]


@pytest.mark.parametrize("quantity", ["64GB", "lots", -1])
def test_json_schema_rejects_a_bad_quantity(quantity):
    validator = jsonschema.Draft7Validator(json_schema())
    assert not validator.is_valid({"pools": {"trainer": {"memory": quantity}}})
    assert validator.is_valid({"pools": {"trainer": {"memory": "64Gi"}}})


def test_values_take_camel_case_keys_only_like_the_chart_schema():
    """Python code may build models by field name, but a values file is camelCase (Helm's schema too)."""
    with pytest.raises(SpecError) as exc:
        load_spec({"pools": {"inference": {"gpus_per_node": 2}}})
    assert exc.value.problems == [
        "pools.inference.gpus_per_node: unknown key; did you mean 'pools.inference.gpusPerNode'?"]
