"""FleetSpec: the one values format (camelCase, like Helm values) and the one source of truth.

The same model drives `rollfleet render`, the chart's `values.schema.json`, and the runtime config
that the image reads from the ConfigMap. A rule about one field lives in its type (fields.py, pod.py),
so the generated schema, and with it `helm install`, enforces it too. The rules JSON Schema cannot
express (several fields, sums, comparisons of quantities) are `cross_field_problems`, twinned in the
chart's templates/_validate.tpl. Every problem is one line naming the field path and the fix.
"""

from __future__ import annotations

import copy
import difflib
import re
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, BeforeValidator, Field, StrictStr, ValidationError, ValidationInfo,
                      WithJsonSchema, model_validator)

from rollfleet import vllm_args
from rollfleet.fields import (AnyText, Annotations, Bytes, Digest, EnvName, ExtendedResource, FleetName,
                              ImageRepository, ImageTag, Labels, Model, Namespace, NcclName, NonEmptyLabelValue,
                              ObjectName, Quantity, SecretEnvName, full, integer, mapping, parse_quantity, text)
from rollfleet.pod import Affinity, SecretRef, Toleration, Volume

__all__ = ["FleetSpec", "SpecError", "load_spec", "json_schema", "runtime_config", "cross_field_problems",
           "parse_quantity", "Quantity", "DEFAULT_ENV", "DEFAULT_NCCL_ENV", "RAY_VERSION", "IMAGE_TAG"]

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
KUBERAY_VERSION = "v1.7.0"  # the operator (and CRDs) the objects are written for
PROMETHEUS_OPERATOR_VERSION = "v0.92.1"  # whose CRDs the monitoring objects are checked against (the Makefile's)
RAY_AUTH_SINCE = (2, 52)  # KubeRay's authOptions.mode token needs Ray 2.52.0 or later
IMAGE_TAG = "0.1.0-vllm0.14.1"
MIN_SHM = "1Gi"  # NCCL and vLLM TP break on small /dev/shm (the container default is 64 MiB)
MAX_ANNOTATIONS_BYTES = 256 * 1024  # Kubernetes' limit on all of an object's annotations together


class SpecError(ValueError):
    """One or more problems in a values file; each line names the field path and the fix."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


def _ray_version(value: str) -> str:
    m = re.fullmatch(r"([0-9]+)\.([0-9]+)\.([0-9]+)", value)
    if not m:
        raise ValueError(f"not MAJOR.MINOR.PATCH; use the image's Ray, {RAY_VERSION}")
    if (2, 11) <= (int(m[1]), int(m[2])) <= (2, 37):
        raise ValueError(f"in 2.11–2.37, whose probes hang under KubeRay; use {RAY_VERSION} (the image's Ray)")
    return value


RayVersion = Annotated[StrictStr, AfterValidator(_ray_version), WithJsonSchema({"type": "string", "allOf": [
    {"pattern": full(r"[0-9]+\.[0-9]+\.[0-9]+")}, {"not": {"pattern": r"^2\.(1[1-9]|2[0-9]|3[0-7])\."}}]})]


def ray_version_tuple(version: str) -> tuple[int, int]:
    """(major, minor) of a Ray version; (0, 0) for text that is not one."""
    m = re.match(r"([0-9]+)\.([0-9]+)", version)
    return (int(m[1]), int(m[2])) if m else (0, 0)


def _no_sidecar(value: Any) -> Any:
    if value == "SidecarMode":
        raise ValueError("SidecarMode is known to hang in Initializing (kuberay#4945); use K8sJobMode or HTTPMode")
    return value


SubmissionMode = Annotated[Literal["K8sJobMode", "HTTPMode"], BeforeValidator(_no_sidecar)]


def _utilization(value: float) -> float:
    if not 0 < value <= 1:
        raise ValueError("outside (0, 1]; use e.g. 0.9 (lower to 0.8 or 0.7 on CUDA out of memory)")
    return value


GpuMemoryUtilization = Annotated[float, AfterValidator(_utilization), WithJsonSchema(
    {"type": "number", "exclusiveMinimum": 0, "maximum": 1})]


def _engine_arg(key: str) -> str:
    problem = vllm_args.problem(key)
    if problem:
        raise ValueError(problem)
    return key


EngineArgKey = Annotated[StrictStr, AfterValidator(_engine_arg), WithJsonSchema(
    {"type": "string", "enum": vllm_args.schema_names()})]


def _with_cumem(env: dict[str, str]) -> dict[str, str]:
    if env.get("NCCL_CUMEM_ENABLE") != "0":
        raise ValueError("NCCL_CUMEM_ENABLE must be '0' (vLLM sets it to 0 in its own processes and both sides of "
                         "the sync group must match); set ncclEnv.NCCL_CUMEM_ENABLE: '0'")
    return env


NcclEnv = Annotated[mapping(NcclName, AnyText), AfterValidator(_with_cumem), WithJsonSchema({
    "type": "object", "required": ["NCCL_CUMEM_ENABLE"], "properties": {"NCCL_CUMEM_ENABLE": {"const": "0"}},
    "propertyNames": {"type": "string", "pattern": full("NCCL_[A-Za-z0-9_]*")},
    "additionalProperties": {"type": "string"}})]
Entrypoint = text(r"[A-Za-z_][\w.]*:[A-Za-z_]\w*", "not module:function; write e.g. my_pkg.train:main")
ModelName = text(r"[^\x00-\x1f]+", "not a model id or path; write a Hugging Face repo id (org/name) or a path, "
                 "on one line", max_length=1024)
Revision = text(r"[^\x00-\x1f ]+", "not a Hugging Face revision; write a branch, tag or commit, without spaces",
                max_length=255)
QueueName = text(r"[^\x00-\x1f/ ]+|root(\.[^\x00-\x1f. ]+)*", "not a queue name; write the LocalQueue, Volcano "
                 "queue or YuniKorn queue (e.g. root.rl) without spaces", max_length=253)


class Image(Model):
    repository: ImageRepository = "ghcr.io/rollfleet/runtime"
    """Image repository; one image serves both pools so NCCL and every library match on both sides."""
    tag: ImageTag = IMAGE_TAG
    digest: Digest | None = None
    """Optional `sha256:…` digest; when set the image is pulled by digest."""
    pull_policy: Literal["Always", "IfNotPresent", "Never"] = "IfNotPresent"
    pull_secrets: list[ObjectName] = []
    """Names of existing `kubernetes.io/dockerconfigjson` Secrets (referenced, never read)."""

    @property
    def ref(self) -> str:
        return f"{self.repository}@{self.digest}" if self.digest else f"{self.repository}:{self.tag}"


class Head(Model):
    cpu: Quantity = "4"
    memory: Bytes = "16Gi"
    ephemeral_storage: Bytes | None = None
    """`ephemeral-storage` request (Ray's logs and object spilling live there); null: none."""
    node_selector: Labels = {}
    tolerations: list[Toleration] = []
    affinity: Affinity | None = None


class Rdma(Model):
    enabled: bool = False
    resource_name: ExtendedResource = "rdma/ib"
    """Extended resource of the RDMA device plugin (e.g. `rdma/ib`, `nvidia.com/hostdev`)."""
    count: integer(1, 64) = 1


class Pool(Model):
    nodes: integer(1) = 1
    """Pods (one per node) in this pool."""
    gpus_per_node: integer(1, 16) = 4
    """`nvidia.com/gpu` limit of each pod; Ray's `num-gpus` follows it."""
    cpu: Quantity = "32"
    memory: Bytes = "256Gi"
    shm_size: Bytes = "64Gi"
    """Size limit of the `/dev/shm` emptyDir (Memory); NCCL breaks on the 64 MiB container default."""
    ephemeral_storage: Bytes | None = None
    """`ephemeral-storage` request of each pod; null: none."""
    gpu_product: NonEmptyLabelValue | None = "NVIDIA-H100-80GB-HBM3"
    """Value of the `nvidia.com/gpu.product` node label to select; null selects any GPU node."""
    node_selector: Labels = {}
    tolerations: list[Toleration] = []
    affinity: Affinity | None = None
    labels: Labels = {}
    annotations: Annotations = {}
    rdma: Rdma = Rdma()

    @property
    def gpus(self) -> int:
        return self.nodes * self.gpus_per_node


class Pools(Model):
    trainer: Pool = Pool()
    inference: Pool = Pool()
    colocated: Pool | None = None
    """The colocated layout: one pool whose every GPU holds a trainer rank and an engine (vLLM asleep
    while the trainer trains, weights handed over through CUDA IPC); then trainer and inference are unused."""


class ModelSpec(Model):
    name: ModelName = "Qwen/Qwen2.5-7B-Instruct"
    """Hugging Face repo id or a path inside the image/volume."""
    revision: Revision | None = None
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "bfloat16"
    max_model_len: integer(16) | None = 4096
    hf_token_secret: SecretRef | None = None
    """Existing Secret holding the Hugging Face token; injected only through `secretKeyRef`."""


class Vllm(Model):
    tensor_parallel_size: integer(1, 16) = 1
    gpu_memory_utilization: GpuMemoryUtilization = 0.9
    enable_prefix_caching: bool = True
    enforce_eager: bool = False
    seed: integer(0) = 0
    max_num_seqs: integer(1) | None = None
    extra_engine_args: dict[EngineArgKey, Any] = {}
    """Passed to vLLM's engine args as-is (snake_case keys vLLM's EngineArgs has, none rollfleet sets)."""


class Sync(Model):
    """The weight-sync group; its backend follows from `engine` (FleetSpec.sync_backend)."""

    bucket_mib: integer(1, 16384) = Field(default=1024, alias="bucketMiB")
    """Size of each of the two packing buffers; 0.5–4 GiB is where published numbers sit."""
    timeout_seconds: integer(1) = 600
    """Rendezvous and per-push collective timeout; a dead engine surfaces as an error within it."""
    verify_checksums: bool = True
    """Compare a per-tensor checksum on trainer and every engine after each push."""
    inflight: Literal["wait", "abort", "keep"] = "wait"
    """Requests in flight when a push arrives: `wait` stops admitting and drains them (open-instruct's
    default), `abort` aborts and resubmits them on the new weights, `keep` freezes them across the
    update (their samples say so: admitted and completed versions differ)."""


class Rollout(Model):
    max_staleness: integer(0, 64) = 1
    """Versions a sample may be older than the policy it trains: 1 (open-instruct's default) lets
    step k+1 generate while step k trains; 0 is strictly on-policy."""
    queue_size: integer(1) = 4096
    """Samples one rollout client may have outstanding (submitted, not yet taken); submit blocks
    beyond it, so a slow trainer slows submission instead of growing memory."""


AbsolutePath = text(r"/[^\x00-\x1f\x7f]*", "not an absolute path; give a directory inside the container, "
                    "e.g. a PVC's mount path from `volumes`", max_length=4096)


class Timeouts(Model):
    init_seconds: integer(1) = 1200
    """Engine start (placement + model load + profile)."""
    health_seconds: integer(1) = 600


_REMOTE = r"(s3|gs|https?)://\S+"
# No credentials in a URL (they would be rendered into the RayJob and the ConfigMap): Go's RE2 has no
# lookahead, so as a second pattern: no '@' at all, or (a pip direct reference) one before the URL only.
_NO_CREDENTIALS = ("; no user:password@ in it: credentials reach Ray through secretEnv (e.g. AWS_ACCESS_KEY_ID "
                   "from a Secret), never the values file")
CodeLocation = text(rf"{_REMOTE}\.zip|/\S*", "not a code location; give a .zip at s3://, gs:// or https://, or "
                    "an absolute directory inside the image (a local path on your machine is not on the cluster)"
                    + _NO_CREDENTIALS, extra=("[^@]*",))
ModuleLocation = text(rf"{_REMOTE}\.(zip|whl)|/\S*", "not a module location; give a .zip or .whl at s3://, gs:// "
                      "or https://, or an absolute directory inside the image" + _NO_CREDENTIALS, extra=("[^@]*",))
PipRequirement = text(r"[A-Za-z0-9][^\s;]*( *;[^\n\r]*)?", "not a pip requirement; write e.g. 'math-verify==0.7.0'"
                      + _NO_CREDENTIALS, extra=(r"[^@]*|[^@]*@ *[a-z+]+://[^\s/@]+(/[^@]*)?",))


class RuntimeEnv(Model):
    """Ray's runtime env of the job (driver, trainer ranks, engines): how trainer code reaches the
    cluster without a derived image. Rendered as the RayJob's `runtimeEnvYAML`."""

    working_dir: CodeLocation | None = None
    """Your trainer's code: a .zip at s3://, gs:// or https://, or a directory inside the image; it
    becomes every process's working directory and import path (`job.entrypoint: my_trainer:main`)."""
    py_modules: list[ModuleLocation] = []
    """More packages to import: .zip or .whl URIs, or directories inside the image."""
    pip: list[PipRequirement] = []
    """pip requirements installed for the job (e.g. `math-verify==0.7.0`); pin them."""
    env_vars: mapping(EnvName, AnyText) = {}
    """Environment variables of the job's processes (no secret values: those go through secretEnv)."""

    def ray(self) -> dict[str, Any]:
        """The runtime env as Ray reads it (snake_case keys, empty ones left out)."""
        return {k: v for k, v in self.model_dump().items() if v}


class Recovery(Model):
    """Engine supervision (docs/operations.md): each engine is probed through its engine core, a dead or
    frozen one is killed and restarted on its GPUs, re-admitted after a weight sync, and the requests
    it held are sent again to live engines."""

    probe_seconds: integer(1, 3600) = 5
    """How often each engine is probed with a round trip through its engine core."""
    probe_timeout_seconds: integer(1, 3600) = 20
    """A probe unanswered this long makes the engine suspect, a second one dead (killed and restarted)."""
    max_restarts: integer(0, 1000) = 3
    """Restarts of one engine within `windowSeconds`; a failure beyond them stops the run, naming the engine."""
    window_seconds: integer(1) = 3600
    min_engines: integer(0, 10000) = 1
    """Fewer live engines than this (dead ones whose budget is spent) stops the run."""
    request_attempts: integer(1, 100) = 5
    """How often one rollout request is sent (the first time + re-sends after engine faults) before it
    is one error naming it."""


class Checkpoint(Model):
    """The built-in trainer's checkpoints: model, optimizer, step, weight version and data position."""

    path: AbsolutePath | None = None
    """A directory on shared storage (e.g. a PVC in `volumes`); a restarted job resumes from the newest
    checkpoint in it. null: no checkpoints."""
    every_steps: integer(1) = 10
    keep: integer(1, 1000) = 2
    """Checkpoints kept (the oldest are deleted once a newer one is complete)."""


class Job(Model):
    enabled: bool = True
    """true: a RayJob that creates its own RayCluster; false: a standalone RayCluster."""
    entrypoint: Entrypoint | None = None
    """`module:function` of your trainer, called as `function(ctx)` on every trainer rank
    (rollfleet.runtime.trainer_group.TrainerContext); null runs the built-in GRPO trainer."""
    runtime_env: RuntimeEnv = RuntimeEnv()
    steps: integer(1) = 3
    """Steps of the built-in GRPO trainer."""
    checkpoint: Checkpoint = Checkpoint()
    backoff_limit: integer(0, 100) = 0
    """RayJob retries: each retry is a new RayCluster, and the built-in trainer resumes from the newest
    checkpoint (job.checkpoint.path). KubeRay never retries a job past activeDeadlineSeconds."""
    submission_mode: SubmissionMode = "K8sJobMode"
    active_deadline_seconds: integer(1) | None = None
    ttl_seconds_after_finished: integer(0) = 3600
    shutdown_after_job_finishes: bool = True


class RayAuth(Model):
    mode: Literal["auto", "token", "disabled"] = "auto"
    """`token`: KubeRay's Ray token authentication; `auto`: token where rayVersion supports it (≥ 2.52.0)."""
    secret_name: ObjectName | None = None
    """Existing Secret with key `auth_token`; null: KubeRay generates one per cluster."""


class GangScheduling(Model):
    scheduler: Literal["kueue", "volcano", "yunikorn"] | None = None
    """Admit the whole fleet at once: Kueue (queue label), or KubeRay's Volcano / YuniKorn integration."""
    queue: QueueName | None = None
    """Kueue LocalQueue (required for kueue), Volcano queue or YuniKorn queue (e.g. root.rl)."""


class PodSecurity(Model):
    run_as_user: integer(1) = 1000
    """UID of every container (the image's `ray` user); runAsNonRoot is always set."""
    run_as_group: integer(0) = 100
    fs_group: integer(0) | None = 100
    """Group owning mounted volumes (so PVCs are writable); null: leave them as they are."""
    seccomp_profile: Literal["RuntimeDefault", "Unconfined"] = "RuntimeDefault"
    """RuntimeDefault passes Pod Security "restricted"; Unconfined only where CUDA IPC needs it."""


Port = Literal["dashboard", "client", "gcs", "metrics"]
PORTS = {"gcs": 6379, "dashboard": 8265, "client": 10001, "metrics": 8080}


class Ingress(Model):
    namespace: Namespace
    """Pods of this namespace may reach the fleet on `ports`."""
    ports: list[Port] = Field(min_length=1)
    """dashboard (8265: the job API, which runs code), client (10001), gcs (6379), metrics (8080)."""


class NetworkPolicy(Model):
    enabled: bool = True
    """Render a NetworkPolicy: the fleet's pods reach each other on any port; from elsewhere only `ingress`."""
    operator_namespace: Namespace | None = None
    """Namespace of the KubeRay operator, which reads job status from the dashboard (8265); null: the
    operator's pods (`app.kubernetes.io/component: kuberay-operator`, under both its Helm chart and its
    kustomize manifests) in any namespace, which lets any pod that carries the label in: set it."""
    ingress: list[Ingress] = []


class PodMonitor(Model):
    enabled: bool = False
    """Render a PodMonitor (monitoring.coreos.com/v1, the Prometheus Operator's): Ray's metrics port
    (8080) on the head and every worker, relabelled with `ray_io_cluster` as KubeRay's own."""
    labels: Labels = {}
    """Labels your Prometheus' podMonitorSelector matches (kube-prometheus-stack: `release: <its release>`)."""
    interval_seconds: integer(1, 3600) = 30


class Scraper(Model):
    namespace: Namespace | None = None
    """Namespace of the Prometheus that scrapes the fleet: with podLabels, the NetworkPolicy admits
    those pods, and only them, to the metrics port (8080)."""
    pod_labels: Labels = {}
    """Labels of the Prometheus pods (e.g. `app.kubernetes.io/name: prometheus`)."""


class Alerts(Model):
    enabled: bool = False
    """Render a PrometheusRule with rollfleet's alerts (docs/monitoring.md)."""
    labels: Labels = {}
    """Labels your Prometheus' ruleSelector matches (kube-prometheus-stack: `release: <its release>`)."""
    restarts: integer(1, 1000) = 3
    """Alert when one engine is restarted this many times within an hour."""
    no_step_minutes: integer(1, 10080) = 30
    """Alert when no training step was reported for this long."""
    push_seconds: integer(1, 86400) = 120
    """Alert when the 90th percentile of a weight push over 15 minutes takes longer."""


class Dashboard(Model):
    enabled: bool = False
    """Render the Grafana dashboard as a ConfigMap (docs/monitoring.md)."""
    labels: Labels = {"grafana_dashboard": "1"}
    """The label Grafana's dashboard sidecar looks for (kube-prometheus-stack: grafana.sidecar.dashboards.label)."""


class Monitoring(Model):
    pod_monitor: PodMonitor = PodMonitor()
    scraper: Scraper = Scraper()
    alerts: Alerts = Alerts()
    dashboard: Dashboard = Dashboard()


class FleetSpec(Model):
    name: FleetName = "rollfleet"
    namespace: Namespace = "default"
    global_: dict[str, Any] = Field(default={}, alias="global")
    """Helm's values shared with subcharts; accepted so the chart can be a subchart, never rendered."""
    engine: Literal["vllm", "cpu-standin"] = "vllm"
    """`vllm`: real vLLM engines on GPUs. `cpu-standin`: HF transformers on CPU, a labelled stand-in."""
    image: Image = Image()
    ray_version: RayVersion = RAY_VERSION
    ray_auth: RayAuth = RayAuth()
    head: Head = Head()
    pools: Pools = Pools()
    model: ModelSpec = ModelSpec()
    vllm: Vllm = Vllm()
    sync: Sync = Sync()
    rollout: Rollout = Rollout()
    timeouts: Timeouts = Timeouts()
    recovery: Recovery = Recovery()
    job: Job = Job()
    gang_scheduling: GangScheduling = GangScheduling()
    priority_class_name: ObjectName | None = None
    """PriorityClass of every pod."""
    service_account_name: ObjectName | None = None
    """ServiceAccount of every pod; null: the namespace's default, with no API token mounted."""
    pod_security: PodSecurity = PodSecurity()
    volumes: list[Volume] = []
    network_policy: NetworkPolicy = NetworkPolicy()
    monitoring: Monitoring = Monitoring()
    nccl_env: NcclEnv = dict(DEFAULT_NCCL_ENV)
    """NCCL_* variables set identically on both pools (mismatches break the sync group)."""
    env: mapping(EnvName, AnyText) = dict(DEFAULT_ENV)
    secret_env: dict[SecretEnvName, SecretRef] = {}
    """Variables read from existing Secrets (W&B keys and the like), on every Ray container."""

    @property
    def colocated(self) -> bool:
        """The colocated layout (pools.colocated): trainer ranks and engines share every GPU."""
        return self.pools.colocated is not None

    @property
    def groups(self) -> list[tuple[str, Pool, tuple[str, ...]]]:
        """The worker groups: (name, pool, the Ray resources the group carries, each = GPUs per node)."""
        if self.pools.colocated is not None:
            return [("colocated", self.pools.colocated, ("trainer", "inference"))]
        return [("trainer", self.pools.trainer, ("trainer",)), ("inference", self.pools.inference, ("inference",))]

    @property
    def trainer_pool(self) -> Pool:
        return self.pools.colocated or self.pools.trainer

    @property
    def inference_pool(self) -> Pool:
        return self.pools.colocated or self.pools.inference

    @property
    def engines(self) -> int:
        """Number of engines: inference GPUs / TP (derived, never typed)."""
        return self.inference_pool.gpus // self.vllm.tensor_parallel_size

    @property
    def world_size(self) -> int:
        """The NCCL weight-sync group: trainer rank 0 + every engine worker (dedicated layout)."""
        return 1 + self.engines * self.vllm.tensor_parallel_size

    @property
    def sync_backend(self) -> Literal["nccl", "gloo", "ipc"]:
        """The weight transport, from the engine and the layout: NCCL for vLLM on GPUs, gloo for the CPU
        stand-in, CUDA IPC (a shared-memory stand-in on CPU) when trainer and engine share the GPUs."""
        if self.colocated:
            return "ipc"
        return "nccl" if self.engine == "vllm" else "gloo"

    @property
    def ray_auth_token(self) -> bool:
        """Whether the cluster uses KubeRay's Ray token authentication."""
        supported = ray_version_tuple(self.ray_version) >= RAY_AUTH_SINCE
        return self.ray_auth.mode == "token" or (self.ray_auth.mode == "auto" and supported)

    @model_validator(mode="after")
    def _cross_field_rules(self, info: ValidationInfo) -> FleetSpec:
        problems = cross_field_problems(self) if not (info.context or {}).get("fields_only") else []
        if problems:
            raise ValueError("\n".join(problems))
        return self


COLOCATED_MAX_UTILIZATION = 0.7


def colocated_problems(s: FleetSpec) -> list[str]:
    """The colocated layout's own rules: one pool, the engine's memory share leaves the trainer room,
    and the loop is synchronous (the engine sleeps while the trainer trains)."""
    p = []
    default = Pool()
    for name in ("trainer", "inference"):
        if getattr(s.pools, name) != default:
            p.append(f"pools.{name}: the colocated layout has one pool, pools.colocated; remove pools.{name}")
    if s.vllm.tensor_parallel_size != 1:
        p.append("vllm.tensorParallelSize: the colocated layout runs one TP=1 engine per GPU (each trainer rank "
                 "hands its weights to the engine on its own GPU); set it to 1, or use dedicated pools for TP > 1")
    if s.vllm.gpu_memory_utilization > COLOCATED_MAX_UTILIZATION:
        p.append(f"vllm.gpuMemoryUtilization: {s.vllm.gpu_memory_utilization} leaves the trainer too little of the "
                 f"shared GPU (its weights and optimizer stay there while the engine generates); set at most "
                 f"{COLOCATED_MAX_UTILIZATION}, e.g. 0.5")
    if s.sync.inflight != "wait":
        p.append(f"sync.inflight: {s.sync.inflight} has nothing to act on in the colocated layout (the engine is "
                 f"idle and asleep when weights arrive); set sync.inflight: wait")
    if s.rollout.max_staleness != 0:
        p.append(f"rollout.maxStaleness: {s.rollout.max_staleness} needs generation to overlap training, which the "
                 f"colocated layout cannot do (the engine sleeps while the trainer trains); set it to 0")
    return p


def cross_field_problems(s: FleetSpec) -> list[str]:
    """Rules JSON Schema cannot express (several fields, sums, quantity comparisons), twinned in the chart's
    templates/_validate.tpl. Each line: `path: what is wrong; the fix`."""
    p: list[str] = []
    tp = s.vllm.tensor_parallel_size
    inf = s.inference_pool
    where = "colocated" if s.colocated else "inference"
    for pool_name, pool, _ in s.groups:
        if parse_quantity(pool.shm_size) < parse_quantity(MIN_SHM):
            p.append(f"pools.{pool_name}.shmSize: {pool.shm_size} is below {MIN_SHM}; NCCL and vLLM need a "
                     f"large /dev/shm, set {MIN_SHM} or more")
        elif parse_quantity(pool.memory) < parse_quantity(pool.shm_size):
            p.append(f"pools.{pool_name}.shmSize: {pool.shm_size} exceeds pools.{pool_name}.memory "
                     f"{pool.memory}; /dev/shm counts against pod memory, lower shmSize or raise memory")
        size = sum(len(k.encode()) + len(v.encode()) for k, v in pool.annotations.items())
        if size > MAX_ANNOTATIONS_BYTES:
            p.append(f"pools.{pool_name}.annotations: {size} bytes in all, over Kubernetes' 262144 (256 KiB); "
                     f"move large data into a ConfigMap")
    if tp > inf.gpus_per_node:
        p.append(f"vllm.tensorParallelSize: {tp} > pools.{where}.gpusPerNode {inf.gpus_per_node}; an "
                 f"engine never spans nodes, lower tensorParallelSize or raise gpusPerNode")
    elif inf.gpus_per_node % tp:
        p.append(f"vllm.tensorParallelSize: {tp} does not divide pools.{where}.gpusPerNode "
                 f"{inf.gpus_per_node}; choose a divisor so engines fill each node")
    elif s.recovery.min_engines > s.engines:  # only once the engine count itself is right
        p.append(f"recovery.minEngines: {s.recovery.min_engines} is more than the fleet's {s.engines} engine(s); "
                 f"lower it (the fleet would fail at its first fault)")
    if s.colocated:
        p.extend(colocated_problems(s))
    if s.vllm.enable_prefix_caching and s.env.get("VLLM_USE_V1") == "0":
        p.append("vllm.enablePrefixCaching: prefix caching needs the V1 engine but env.VLLM_USE_V1 is '0'; "
                 "set env.VLLM_USE_V1: '1' or enablePrefixCaching: false")
    if s.engine == "cpu-standin" and tp != 1:
        p.append("vllm.tensorParallelSize: the cpu-standin engine has no tensor parallelism; set it to 1")
    if s.ray_auth.mode == "token" and ray_version_tuple(s.ray_version) < RAY_AUTH_SINCE:
        p.append(f"rayAuth.mode: token needs Ray 2.52.0 or later (rayVersion is {s.ray_version}); "
                 f"use rayAuth.mode: auto or disabled, or a newer Ray")
    if s.job.runtime_env.ray() and not s.job.enabled:
        p.append("job.runtimeEnv: only a RayJob carries a runtime env and job.enabled is false (a standing "
                 "RayCluster); set job.enabled: true, or pass --runtime-env-json when you submit your own job")
    gang = s.gang_scheduling
    if gang.scheduler == "kueue" and not gang.queue:
        p.append("gangScheduling.queue: Kueue admits a job through a LocalQueue; name it here")
    if gang.queue and not gang.scheduler:
        p.append("gangScheduling.queue: a queue without a scheduler does nothing; set gangScheduling.scheduler")
    scraper = s.monitoring.scraper
    if bool(scraper.namespace) != bool(scraper.pod_labels):
        p.append("monitoring.scraper: set both namespace and podLabels (the Prometheus pods the NetworkPolicy "
                 "admits to the metrics port 8080), or neither")
    elif s.monitoring.pod_monitor.enabled and s.network_policy.enabled and not scraper.namespace:
        p.append("monitoring.scraper.namespace: the NetworkPolicy keeps Prometheus from the metrics port (8080); "
                 "set monitoring.scraper.namespace and podLabels to your Prometheus pods, or networkPolicy.enabled: false")
    for name in sorted(s.secret_env.keys() & s.env.keys()):
        p.append(f"secretEnv.{name}: also set in env; keep one of them")
    for field, seen in (("name", {}), ("mountPath", {})):
        for i, volume in enumerate(s.volumes):
            value = volume.name if field == "name" else volume.mount_path.removesuffix("/")
            if value in seen:
                p.append(f"volumes[{i}].{field}: {value} is also volumes[{seen[value]}]'s; make it unique")
            seen.setdefault(value, i)
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


# Keys that were values keys once: what to do instead.
REMOVED = {
    ("sync", "backend"): "no longer a key: the transport follows from the layout and the engine (CUDA IPC when "
                         "pools.colocated, else nccl for vllm, gloo for cpu-standin); remove it",
    ("sync", "port"): "no longer a key: the trainer takes a port the kernel picks; remove it",
}
TYPE_FIXES = {
    "string_type": "write it in quotes so YAML keeps it a string",
    "int_type": "write a whole number without quotes",
    "bool_type": "write true or false without quotes",
    "float_type": "write a number without quotes",
}


def _format(err: dict) -> str:
    loc = tuple(err["loc"])
    is_key = bool(loc) and loc[-1] == "[key]"
    loc = loc[:-1] if is_key else loc
    path = _path(loc) or "(root)"
    if err["type"] == "extra_forbidden":
        if loc in REMOVED:
            return f"{path}: {REMOVED[loc]}"
        close = _closest_key(loc)
        hint = f"did you mean {'.'.join([*path.split('.')[:-1], close])!r}?" if close else \
            f"known keys here: {', '.join(_known_keys(loc))}"
        return f"{path}: unknown key; {hint}"
    if err["type"] == "value_error" and not loc:
        return err["msg"].removeprefix("Value error, ")
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] in TYPE_FIXES:
        msg = f"{msg}; {TYPE_FIXES[err['type']]}"
    got = err.get("input")
    return f"{path}: {msg}" if is_key else f"{path}: {msg} (got {_short(got)})"


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:60] + f"… ({len(text)} characters)"


def _drop(values: Any, loc: tuple) -> None:
    """Remove what `loc` points at from `values` (the whole list when it points into one)."""
    node = values
    parts = [part for part in loc if part != "[key]"]
    for i, part in enumerate(parts):
        if not isinstance(node, dict) or part not in node:
            return
        if i == len(parts) - 1 or isinstance(node[part], list):
            del node[part]
            return
        node = node[part]


def _strict_errors(values: dict[str, Any]) -> list[dict]:
    try:
        FleetSpec.model_validate(values, by_alias=True, by_name=False, context={"fields_only": True})
    except ValidationError as exc:
        return exc.errors()
    return []


def _cross_field_despite(values: dict[str, Any], errors: list[dict]) -> list[str]:
    """Cross-field problems of the rest of the file, so one run reports every problem: the fields in error
    are left out (the defaults stand in) and problems that name one of them are dropped."""
    rest, bad = copy.deepcopy(values), set()
    for _ in range(5):
        if not errors:
            break
        for err in errors:
            bad.add(_path(tuple(part for part in err["loc"] if part != "[key]")))
            _drop(rest, tuple(err["loc"]))
        errors = _strict_errors(rest)
    if errors:
        return []
    names = re.compile("|".join(re.escape(b) for b in sorted(bad, key=len, reverse=True) if b))
    spec = FleetSpec.model_validate(rest, by_alias=True, by_name=False, context={"fields_only": True})
    return [line for line in cross_field_problems(spec) if not (bad and names.search(line))]


def load_spec(values: dict[str, Any] | None) -> FleetSpec:
    """Validate plain values (from YAML/JSON) into a FleetSpec, or raise SpecError with one line per problem."""
    values = values or {}
    try:
        # values files use the camelCase keys only (as Helm's schema does); Python code may use names
        return FleetSpec.model_validate(values, by_alias=True, by_name=False)
    except ValidationError as exc:
        errors = exc.errors()
    # a misspelt required key is one problem: keep "unknown key; did you mean", drop "Field required"
    meant = {(*e["loc"][:-1], _closest_key(tuple(e["loc"]))) for e in errors if e["type"] == "extra_forbidden"}
    lines: list[str] = []
    for err in errors:
        if err["type"] == "missing" and tuple(err["loc"]) in meant:
            continue
        lines.extend(_format(err).splitlines())
    if not all(e["type"] == "value_error" and not e["loc"] for e in errors):  # field errors: cross-field too
        lines.extend(_cross_field_despite(values, errors))
    raise SpecError(lines)


def json_schema() -> dict[str, Any]:
    """JSON Schema of the values (camelCase), used as the chart's values.schema.json."""
    schema = FleetSpec.model_json_schema(by_alias=True, mode="validation")
    schema["$schema"] = "https://json-schema.org/draft-07/schema#"
    schema["title"] = "rollfleet values"
    return schema


def runtime_config(spec: FleetSpec) -> dict[str, Any]:
    """The JSON the launcher reads from the ConfigMap (parsed back by `load_spec`)."""
    return spec.model_dump(mode="json", by_alias=True, exclude={"global_"})
