"""FleetSpec: the one values format (camelCase, like Helm values) and the one source of truth.

The same model drives `rollfleet render`, the chart's `values.schema.json`, and the runtime config
that the image reads from the ConfigMap. Every rule that JSON Schema cannot express lives in
`FleetSpec._cross_field_rules`, and each failure names the field path and the fix.
"""

from __future__ import annotations

import difflib
import re
from decimal import Decimal
from typing import Any, Literal

from typing import Annotated

from pydantic import (AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError,
                      WithJsonSchema, model_validator)
from pydantic.alias_generators import to_camel

DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
# KubeRay refuses RayCluster/RayJob names that are not DNS-1035 labels (must start with a letter).
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
QUANTITY = re.compile(r"^([0-9]+(?:\.[0-9]+)?)(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
SUFFIX = {"m": Decimal("0.001"), None: Decimal(1), **{s: Decimal(1000) ** (i + 1) for i, s in enumerate("kMGTPE")},
          **{s + "i": Decimal(1024) ** (i + 1) for i, s in enumerate("KMGTPE")}}
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# KubeRay's probes hang with Ray 2.11–2.37 (DESIGN.md §2): refused.
BAD_RAY = ((2, 11), (2, 37))

DEFAULT_ENV = {
    "VLLM_USE_V1": "1",
    "VLLM_DISABLE_COMPILE_CACHE": "1",
    "VLLM_ATTENTION_BACKEND": "FLASH_ATTN",
    "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",
    "VLLM_LOGGING_LEVEL": "WARNING",
}
# vLLM sets NCCL_CUMEM_ENABLE=0 in its own processes; the trainer must match (NeMo-RL #564, SkyRL #143).
DEFAULT_NCCL_ENV = {"NCCL_CUMEM_ENABLE": "0"}
RAY_VERSION = "2.52.1"  # equals the image lock's ray (tests check it)
IMAGE_TAG = "0.1.0-vllm0.14.1"


class SpecError(ValueError):
    """One or more problems in a values file; each line names the field path and the fix."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class Model(BaseModel):
    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True,
        use_attribute_docstrings=True,
    )


def _quantity_type(value: Any) -> Any:
    """One error for a non-string, non-integer quantity (not one per member of `str | int`)."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"{value!r} is not a Kubernetes quantity; quote it, e.g. '8', '500m', '0.5', '64Gi'")
    return value


def _quantity(value: str | int) -> str:
    if not QUANTITY.match(str(value)):
        raise ValueError(f"{value!r} is not a Kubernetes quantity; write e.g. '8', '500m', '64Gi'")
    return str(value)


def parse_quantity(value: str | int) -> Decimal:
    """A Kubernetes quantity ('64Gi', '500m', '8') as a number."""
    m = QUANTITY.match(str(value))
    if not m:
        raise ValueError(f"{value!r} is not a Kubernetes quantity")
    return Decimal(m[1]) * SUFFIX[m[2]]


# The pattern is in the JSON Schema too, so `helm install` rejects a bad quantity before rendering.
Quantity = Annotated[str | int, BeforeValidator(_quantity_type), AfterValidator(_quantity), WithJsonSchema(
    {"anyOf": [{"type": "string", "pattern": QUANTITY.pattern}, {"type": "integer", "minimum": 0}]})]


class Toleration(Model):
    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Exists"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class Image(Model):
    repository: str = "ghcr.io/rollfleet/runtime"
    """Image repository; one image serves both pools so NCCL and every library match on both sides."""
    tag: str = IMAGE_TAG
    digest: str | None = Field(default=None, pattern=r"^sha256:[0-9a-f]{64}$")
    """Optional `sha256:…` digest; when set the image is pulled by digest."""
    pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    pull_secrets: list[str] = []
    """Names of existing `kubernetes.io/dockerconfigjson` Secrets (referenced, never read)."""

    @property
    def ref(self) -> str:
        return f"{self.repository}@{self.digest}" if self.digest else f"{self.repository}:{self.tag}"


class Head(Model):
    cpu: Quantity = "4"
    memory: Quantity = "16Gi"
    node_selector: dict[str, str] = {}
    tolerations: list[Toleration] = []


class Rdma(Model):
    enabled: bool = False
    resource_name: str = "rdma/ib"
    """Extended resource of the RDMA device plugin (e.g. `rdma/ib`, `nvidia.com/hostdev`)."""
    count: int = Field(default=1, ge=1)


class Pool(Model):
    nodes: int = Field(default=1, ge=1)
    """Pods (one per node) in this pool."""
    gpus_per_node: int = Field(default=4, ge=0, le=16)
    """`nvidia.com/gpu` limit of each pod; Ray's `num-gpus` follows it."""
    cpu: Quantity = "32"
    memory: Quantity = "256Gi"
    shm_size: Quantity = "64Gi"
    """Size limit of the `/dev/shm` emptyDir (Memory); NCCL breaks on the 64 MiB container default."""
    gpu_product: str | None = "NVIDIA-H100-80GB-HBM3"
    """Value of the `nvidia.com/gpu.product` node label to select; null selects any GPU node."""
    node_selector: dict[str, str] = {}
    tolerations: list[Toleration] = []
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    rdma: Rdma = Rdma()

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


class Pools(Model):
    trainer: Pool = Pool()
    inference: Pool = Pool()


class SecretRef(Model):
    name: str
    key: str = "token"


class ModelSpec(Model):
    name: str = "Qwen/Qwen2.5-7B-Instruct"
    """Hugging Face repo id or a path inside the image/volume."""
    revision: str | None = None
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "bfloat16"
    max_model_len: int | None = Field(default=4096, ge=16)
    hf_token_secret: SecretRef | None = None
    """Existing Secret holding the Hugging Face token; injected only through `secretKeyRef`."""


class Vllm(Model):
    tensor_parallel_size: int = Field(default=1, ge=1)
    gpu_memory_utilization: float = 0.9
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    seed: int = 0
    max_num_seqs: int | None = Field(default=None, ge=1)
    extra_engine_args: dict[str, Any] = {}
    """Passed to vLLM's engine args as-is (snake_case keys)."""


class Sync(Model):
    backend: Literal["nccl", "gloo"] = "nccl"
    """`nccl` for the vLLM engine on GPUs; `gloo` for the CPU stand-in engine."""
    bucket_mib: int = Field(default=1024, ge=1, le=16384, alias="bucketMiB")
    """Size of each of the two packing buffers; 0.5–4 GiB is where published numbers sit."""
    timeout_seconds: int = Field(default=600, ge=1)
    """Rendezvous and per-push collective timeout; a dead engine surfaces as an error within it."""
    verify_checksums: bool = True
    """Compare a per-tensor checksum on trainer and every engine after each push."""
    port: int | None = Field(default=None, ge=1024, le=65535)
    """Rendezvous port on the trainer; null picks a free one."""
    inflight: Literal["wait", "abort", "keep"] = "wait"
    """Requests in flight when a push arrives: `wait` stops admitting and drains them (open-instruct's
    default), `abort` aborts and resubmits them on the new weights, `keep` freezes them across the
    update (their samples say so: admitted and completed versions differ)."""


class Rollout(Model):
    max_staleness: int = Field(default=1, ge=0)
    """Versions a sample may be older than the policy it trains: 1 (open-instruct's default) lets
    step k+1 generate while step k trains; 0 is strictly on-policy."""
    queue_size: int = Field(default=4096, ge=1)
    """Samples one rollout client may have outstanding (submitted, not yet taken); submit blocks
    beyond it, so a slow trainer slows submission instead of growing memory."""


class Timeouts(Model):
    init_seconds: int = Field(default=1200, ge=1)
    """Engine start (placement + model load + profile)."""
    health_seconds: int = Field(default=600, ge=1)


REMOTE_ZIP = r"(s3|gs|https?)://[^\s]+\.zip"
IN_IMAGE = r"/[^\s]*"


class RuntimeEnv(Model):
    """Ray's runtime env of the job (driver, trainer ranks, engines): how trainer code reaches the
    cluster without a derived image. Rendered as the RayJob's `runtimeEnvYAML`."""

    working_dir: str | None = Field(default=None, pattern=f"^({REMOTE_ZIP}|{IN_IMAGE})$")
    """Your trainer's code: a .zip at s3://, gs:// or https://, or a directory inside the image; it
    becomes every process's working directory and import path (`job.entrypoint: my_trainer:main`)."""
    py_modules: list[Annotated[str, Field(pattern=f"^({REMOTE_ZIP}|(s3|gs|https?)://[^\\s]+\\.whl|{IN_IMAGE})$")]] = []
    """More packages to import: .zip or .whl URIs, or directories inside the image."""
    pip: list[Annotated[str, Field(pattern=r"^[^\s][^\n\r]*$")]] = []
    """pip requirements installed for the job (e.g. `math-verify==0.7.0`); pin them."""
    env_vars: dict[Annotated[str, Field(pattern=ENV_NAME.pattern)], str] = Field(
        default={}, json_schema_extra={"propertyNames": {"pattern": ENV_NAME.pattern}})
    """Environment variables of the job's processes (no secret values: use env from Secrets)."""

    def ray(self) -> dict[str, Any]:
        """The runtime env as Ray reads it (snake_case keys, empty ones left out)."""
        return {k: v for k, v in self.model_dump().items() if v}


class Job(Model):
    enabled: bool = True
    """true: a RayJob that creates its own RayCluster; false: a standalone RayCluster."""
    entrypoint: str | None = Field(default=None, pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
    """`module:function` of your trainer, called as `function(ctx)` on every trainer rank
    (rollfleet.runtime.trainer_group.TrainerContext); null runs the built-in GRPO trainer."""
    runtime_env: RuntimeEnv = RuntimeEnv()
    steps: int = Field(default=3, ge=1)
    """Steps of the built-in GRPO-shaped smoke trainer."""
    submission_mode: Literal["K8sJobMode", "HTTPMode", "SidecarMode"] = "K8sJobMode"
    active_deadline_seconds: int | None = Field(default=None, ge=1)
    ttl_seconds_after_finished: int = Field(default=3600, ge=0)
    shutdown_after_job_finishes: bool = True


class FleetSpec(Model):
    name: str = "rollfleet"
    namespace: str = "default"
    engine: Literal["vllm", "cpu-standin"] = "vllm"
    """`vllm`: real vLLM engines on GPUs. `cpu-standin`: HF transformers on CPU, a labelled stand-in."""
    image: Image = Image()
    ray_version: str = RAY_VERSION
    head: Head = Head()
    pools: Pools = Pools()
    model: ModelSpec = ModelSpec()
    vllm: Vllm = Vllm()
    sync: Sync = Sync()
    rollout: Rollout = Rollout()
    timeouts: Timeouts = Timeouts()
    job: Job = Job()
    nccl_env: dict[str, str] = dict(DEFAULT_NCCL_ENV)
    """NCCL_* variables set identically on both pools (mismatches break the sync group)."""
    env: dict[str, str] = dict(DEFAULT_ENV)

    @property
    def engines(self) -> int:
        """Number of engines: inference GPUs / TP (derived, never typed)."""
        return self.pools.inference.gpus // self.vllm.tensor_parallel_size

    @property
    def world_size(self) -> int:
        return 1 + self.engines * self.vllm.tensor_parallel_size

    @model_validator(mode="after")
    def _cross_field_rules(self) -> FleetSpec:
        problems = cross_field_problems(self)
        if problems:
            raise ValueError("\n".join(problems))
        return self


def cross_field_problems(s: FleetSpec) -> list[str]:
    """Rules JSON Schema cannot express. Each line: `path: what is wrong; the fix`."""
    p: list[str] = []
    tp = s.vllm.tensor_parallel_size
    inf = s.pools.inference
    if not DNS1035_LABEL.match(s.name) or len(s.name) > 40:
        p.append(f"name: {s.name!r} is not a DNS-1035 label; start with a lowercase letter, then use lowercase "
                 f"letters, digits and '-', at most 40 characters (KubeRay appends suffixes)")
    if not DNS1123_LABEL.match(s.namespace) or len(s.namespace) > 63:
        p.append(f"namespace: {s.namespace!r} is not a DNS-1123 label; use lowercase letters, digits and '-',"
                 f" at most 63 characters")
    for pool_name in ("trainer", "inference"):
        pool = getattr(s.pools, pool_name)
        if pool.gpus_per_node < 1:
            p.append(f"pools.{pool_name}.gpusPerNode: the {pool_name} pool has no GPUs; set it to 1 or more")
        if parse_quantity(pool.memory) < parse_quantity(pool.shm_size):
            p.append(f"pools.{pool_name}.shmSize: {pool.shm_size} exceeds pools.{pool_name}.memory "
                     f"{pool.memory}; /dev/shm counts against pod memory, lower shmSize or raise memory")
    if inf.gpus_per_node >= 1:
        if tp > inf.gpus_per_node:
            p.append(f"vllm.tensorParallelSize: {tp} > pools.inference.gpusPerNode {inf.gpus_per_node}; an "
                     f"engine never spans nodes, lower tensorParallelSize or raise gpusPerNode")
        elif inf.gpus_per_node % tp:
            p.append(f"vllm.tensorParallelSize: {tp} does not divide pools.inference.gpusPerNode "
                     f"{inf.gpus_per_node}; choose a divisor so engines fill each node")
    if not 0 < s.vllm.gpu_memory_utilization <= 1:
        p.append(f"vllm.gpuMemoryUtilization: {s.vllm.gpu_memory_utilization} is outside (0, 1]; "
                 f"use e.g. 0.9 (lower to 0.8 or 0.7 on CUDA out of memory)")
    if s.vllm.enable_prefix_caching and s.env.get("VLLM_USE_V1") == "0":
        p.append("vllm.enablePrefixCaching: prefix caching needs the V1 engine but env.VLLM_USE_V1 is '0'; "
                 "set env.VLLM_USE_V1: '1' or enablePrefixCaching: false")
    want = "nccl" if s.engine == "vllm" else "gloo"
    if s.sync.backend != want:
        p.append(f"sync.backend: engine {s.engine!r} syncs over {want}; set sync.backend: {want}")
    if s.engine == "cpu-standin" and tp != 1:
        p.append(f"vllm.tensorParallelSize: the cpu-standin engine has no tensor parallelism; set it to 1")
    m = re.fullmatch(r"(\d+)\.(\d+)\.(\d+)", s.ray_version)
    if not m:
        p.append(f"rayVersion: {s.ray_version!r} is not MAJOR.MINOR.PATCH; use the image's Ray, {RAY_VERSION}")
    elif BAD_RAY[0] <= (int(m[1]), int(m[2])) <= BAD_RAY[1]:
        p.append(f"rayVersion: {s.ray_version} is in 2.11–2.37, whose probes hang under KubeRay; "
                 f"use {RAY_VERSION} (the image's Ray)")
    if s.job.runtime_env.ray() and not s.job.enabled:
        p.append("job.runtimeEnv: only a RayJob carries a runtime env and job.enabled is false (a standing "
                 "RayCluster); set job.enabled: true, or pass --runtime-env-json when you submit your own job")
    if s.job.submission_mode == "SidecarMode":
        p.append("job.submissionMode: SidecarMode is known to hang in Initializing (kuberay#4945); "
                 "use K8sJobMode or HTTPMode")
    for field, env in (("ncclEnv", s.nccl_env), ("env", s.env)):
        for k in env:
            if not ENV_NAME.match(k):
                p.append(f"{field}.{k}: not a valid environment variable name; use letters, digits and '_'")
    for k in s.nccl_env:
        if not k.startswith("NCCL_"):
            p.append(f"ncclEnv.{k}: only NCCL_* variables belong here; move it to env")
    for k in s.env:
        if k.startswith("NCCL_"):
            p.append(f"env.{k}: NCCL variables go in ncclEnv so both pools get the same value; move it there")
        if k == "HF_TOKEN":
            p.append("env.HF_TOKEN: a secret value in values; put it in a Secret and set model.hfTokenSecret")
    return p


def _path(loc: tuple) -> str:
    return "".join(f"[{part}]" if isinstance(part, int) else f".{part}" for part in loc).lstrip(".")


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The model class that owns the field at `loc` (for 'did you mean' suggestions)."""
    model: Any = FleetSpec
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        field = next((f for n, f in model.model_fields.items() if part in (n, f.alias)), None)
        ann = getattr(field, "annotation", None) if field else None
        args = getattr(ann, "__args__", ())
        ann = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if ann is None:
            return None
        model = ann
    return model


def _known_keys(loc: tuple) -> list[str]:
    model = _model_at(loc)
    return [f.alias or n for n, f in model.model_fields.items()] if model else []


def _closest_key(loc: tuple) -> str | None:
    """The known key an unknown key at `loc` most likely meant, if any."""
    close = difflib.get_close_matches(str(loc[-1]), _known_keys(loc), n=1)
    return close[0] if close else None


def _format(err: dict) -> str:
    loc = tuple(err["loc"])
    path = _path(loc) or "(root)"
    if err["type"] == "extra_forbidden":
        close = _closest_key(loc)
        hint = f"did you mean {'.'.join([*path.split('.')[:-1], close])!r}?" if close else \
            f"known keys here: {', '.join(_known_keys(loc))}"
        return f"{path}: unknown key; {hint}"
    if err["type"] == "value_error" and not loc:
        return err["msg"].removeprefix("Value error, ")
    msg = err["msg"].removeprefix("Value error, ")
    return f"{path}: {msg} (got {err.get('input')!r})"


def load_spec(values: dict[str, Any] | None) -> FleetSpec:
    """Validate plain values (from YAML/JSON) into a FleetSpec, or raise SpecError with one line per problem."""
    try:
        # values files use the camelCase keys only (as Helm's schema does); Python code may use names
        return FleetSpec.model_validate(values or {}, by_alias=True, by_name=False)
    except ValidationError as exc:
        errors = exc.errors()
        # a misspelt required key is one problem: keep "unknown key; did you mean", drop "Field required"
        meant = {(*e["loc"][:-1], _closest_key(tuple(e["loc"]))) for e in errors if e["type"] == "extra_forbidden"}
        lines: list[str] = []
        for err in errors:
            if err["type"] == "missing" and tuple(err["loc"]) in meant:
                continue
            lines.extend(_format(err).splitlines())
        raise SpecError(lines) from None


def json_schema() -> dict[str, Any]:
    """JSON Schema of the values (camelCase), used as the chart's values.schema.json."""
    schema = FleetSpec.model_json_schema(by_alias=True, mode="validation")
    schema["$schema"] = "https://json-schema.org/draft-07/schema#"
    schema["title"] = "rollfleet values"
    return schema


def runtime_config(spec: FleetSpec) -> dict[str, Any]:
    """The JSON the launcher reads from the ConfigMap (parsed back by `load_spec`)."""
    return spec.model_dump(mode="json", by_alias=True)
