"""Every vLLM surface the rollfleet runtime touches, declared once, as plain data.

The runtime must work with vLLM 0.14.1 (the image pin) and 0.20.2 (the GPU test host).
tests/test_vllm_compat.py reads both real wheels from PyPI (only the needed .py files, never
installed) and checks every `Use` below against each; it also AST-scans src/rollfleet/runtime/*.py
and fails when the runtime imports, calls or passes a keyword to a vLLM name not declared here.
So: when the runtime starts using something new from vLLM, add one line here.

Kinds (what the test checks, in each version):
  MODULE    the module exists.
  EXPORT    `from <module> import <qualname>` works: defined there, imported there (not only under
            TYPE_CHECKING), or lazily exported (vllm/__init__.py's MODULE_ATTRS + __getattr__).
  CLASS     <qualname> is a class (re-exports followed).
  CALL      <qualname> is callable with `params`: a function, a method ("Cls.meth"), a constructor
            ("Cls.__init__", or "Cls" for a dataclass / msgspec.Struct: signature from its fields).
  STATIC    like CALL, and the method is a @staticmethod/@classmethod (called on the class).
  FIELD     a class-body attribute of the class or a vLLM base: dataclass / msgspec / config field,
            or class attribute.
  ATTR      an instance attribute: a FIELD, a @property, or `self.<name> = ...` in a method of
            the class or a vLLM base (in one of the methods named by `where`, if given).
  SOURCE    the source of <module> (of the class/function <qualname>, if given) contains every
            string in `values`.
  LITERALS  the annotation of field <qualname> (type aliases and imports resolved) admits every
            string in `values` via Literal[...].

`versions` (default: all of VERSIONS) limits a Use to some versions, for the rare surface the runtime
must reach differently per version (it then branches on what it finds, e.g. `dataclasses.fields`).

`params` reads like the call site's view of a signature: names before "*" are passed positionally,
in that order; names after "*" by keyword; "**" means the runtime relies on a **kwargs catch-all
(`kwargs_to` names the class whose fields that catch-all forwards to, e.g. LLM -> EngineArgs).
The check also fails when the callable has a required parameter the runtime does not pass.
"""

from __future__ import annotations

from dataclasses import dataclass

# The vLLM versions the runtime supports: the image pin and the GPU test host's.
VERSIONS = ("0.14.1", "0.20.2")

MODULE = "module"
EXPORT = "export"
CLASS = "class"
CALL = "call"
STATIC = "staticmethod"
FIELD = "field"
ATTR = "attr"
SOURCE = "source"
LITERALS = "literals"
KINDS = (MODULE, EXPORT, CLASS, CALL, STATIC, FIELD, ATTR, SOURCE, LITERALS)


@dataclass(frozen=True)
class Use:
    kind: str
    module: str
    qualname: str = ""
    params: tuple[str, ...] = ()
    values: tuple[str, ...] = ()
    where: tuple[str, ...] = ()
    kwargs_to: str = ""
    versions: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind {self.kind!r}; one of {KINDS}")
        if not self.module.split(".")[0] == "vllm":
            raise ValueError(f"{self.module!r} is not a vllm module")
        if self.kind != MODULE and self.kind != SOURCE and not self.qualname:
            raise ValueError(f"{self.kind} needs a qualname")
        if self.params and self.kind not in (CALL, STATIC):
            raise ValueError("params only apply to CALL / STATIC")
        if self.params.count("*") > 1 or any(p.startswith("*") and p not in ("*", "**") for p in self.params):
            raise ValueError(f"params {self.params}: use bare '*' and '**' markers only")
        if self.kind in (SOURCE, LITERALS) and not self.values:
            raise ValueError(f"{self.kind} needs values")
        if self.kwargs_to and "**" not in self.params:
            raise ValueError("kwargs_to needs '**' in params")
        if not set(self.versions) <= set(VERSIONS):
            raise ValueError(f"versions {self.versions} not among {VERSIONS}")

    def applies_to(self, version: str) -> bool:
        return not self.versions or version in self.versions

    @property
    def id(self) -> str:
        """Readable test id, e.g. 'call:vllm.entrypoints.llm:LLM.generate(prompts,sampling_params,*,use_tqdm)'."""
        s = f"{self.kind}:{self.module}"
        if self.qualname:
            s += f":{self.qualname}"
        if self.kind in (CALL, STATIC):
            s += "(" + ",".join(self.params) + ")"
        if self.values:
            s += "[" + ",".join(self.values) + "]"
        if self.where:
            s += "@" + "|".join(self.where)
        if self.versions:
            s += "{" + ",".join(self.versions) + "}"
        return s


# LLM(**kwargs) -> EngineArgs(...): the engine arguments the runtime passes (engine.py, VllmEngine).
ENGINE_ARGS = (
    "model", "tokenizer", "revision", "dtype", "seed", "tensor_parallel_size", "gpu_memory_utilization",
    "enable_prefix_caching", "enforce_eager", "max_model_len", "max_num_seqs", "distributed_executor_backend",
    "worker_extension_cls",
    "load_format",  # not passed by engine.py today (may come via vllm.extraEngineArgs)
)
# SamplingParams(...) keywords (a msgspec.Struct: class-level annotated fields).
SAMPLING_PARAMS = ("n", "temperature", "top_p", "max_tokens", "seed")

_LLM = "vllm.entrypoints.llm"
_SP = "vllm.sampling_params"
_OUT = "vllm.outputs"
_DU = "vllm.distributed.utils"
_NCCL = "vllm.distributed.device_communicators.pynccl"

USES: tuple[Use, ...] = (
    # from vllm import LLM, SamplingParams
    Use(EXPORT, "vllm", "LLM"),
    Use(EXPORT, "vllm", "SamplingParams"),
    # the engine: vllm.LLM
    Use(CLASS, _LLM, "LLM"),
    Use(CALL, _LLM, "LLM.__init__", ("*", "model", "**"), kwargs_to="EngineArgs"),
    *(Use(FIELD, "vllm.engine.arg_utils", f"EngineArgs.{name}") for name in ENGINE_ARGS),
    Use(CALL, _LLM, "LLM.generate", ("prompts", "sampling_params", "*", "use_tqdm")),
    Use(CALL, _LLM, "LLM.collective_rpc", ("method", "*", "timeout", "args", "kwargs")),
    Use(CALL, _LLM, "LLM.reset_prefix_cache"),
    Use(CALL, _LLM, "LLM.get_tokenizer"),  # not called by the runtime today
    # executor backend and the worker extension (worker_extension_cls="rollfleet.runtime.ext...")
    Use(LITERALS, "vllm.config", "ParallelConfig.distributed_executor_backend", values=("uni", "mp")),
    Use(FIELD, "vllm.config", "ParallelConfig.worker_extension_cls"),
    Use(SOURCE, "vllm.v1.worker.worker_base", "WorkerWrapperBase.init_worker", values=("worker_extension_cls",)),
    # sampling and outputs
    Use(CALL, _SP, "SamplingParams", ("*", *SAMPLING_PARAMS)),
    *(Use(FIELD, _SP, f"SamplingParams.{name}") for name in SAMPLING_PARAMS),
    Use(ATTR, _OUT, "RequestOutput.outputs"),
    Use(ATTR, _OUT, "RequestOutput.prompt_token_ids"),  # not read by the runtime today
    Use(ATTR, _OUT, "CompletionOutput.text"),
    Use(ATTR, _OUT, "CompletionOutput.token_ids"),
    # weight sync transport (sync.py): StatelessProcessGroup + PyNcclCommunicator
    # sync.make_transport builds the dataclass directly: FAILS on 0.14.1 (required `socket`), see below
    # 0.14.1's dataclass has a required `socket` field that 0.20.2 dropped: sync.make_transport
    # passes socket=None only where `dataclasses.fields` shows it
    Use(CALL, _DU, "StatelessProcessGroup", ("*", "rank", "world_size", "store", "socket"), versions=("0.14.1",)),
    Use(CALL, _DU, "StatelessProcessGroup", ("*", "rank", "world_size", "store"), versions=("0.20.2",)),
    *(Use(FIELD, _DU, f"StatelessProcessGroup.{name}") for name in ("rank", "world_size", "store")),
    # not used by the runtime today (it owns its TCPStore):
    Use(STATIC, _DU, "StatelessProcessGroup.create", ("host", "port", "rank", "world_size", "*", "store_timeout")),
    Use(CALL, _NCCL, "PyNcclCommunicator.__init__", ("group", "*", "device")),
    Use(CALL, _NCCL, "PyNcclCommunicator.broadcast", ("tensor", "*", "src", "stream")),
    # inside the GPU worker (ext.py: methods of the worker extension run as the Worker)
    Use(ATTR, "vllm.v1.worker.gpu_worker", "Worker.device", where=("init_device",)),
    Use(ATTR, "vllm.v1.worker.gpu_worker", "Worker.model_runner", where=("init_device",)),
    Use(ATTR, "vllm.v1.worker.gpu_model_runner", "GPUModelRunner.model"),
    Use(ATTR, "vllm.v1.worker.gpu.model_runner", "GPUModelRunner.model"),  # VLLM_USE_V2_MODEL_RUNNER=1
    Use(CALL, "vllm.model_executor.models.qwen2", "Qwen2ForCausalLM.load_weights", ("*", "weights")),
)

# Known differences between 0.14.1 and 0.20.2 next to these surfaces (kept true by
# tests/test_vllm_compat.py DIFFERENCES) -- do not rely on them without a per-version `versions=` split:
#   StatelessProcessGroup(rank=, world_size=, store=): 0.14.1 also requires `socket` (None is fine for a
#     group that does not own the listening socket); 0.20.2 has no `socket` field at all.
#   StatelessProcessGroup.create(listen_socket=...), .broadcast/.send/.recv/.all_reduce: 0.20.2 only.
#   PyNcclCommunicator.destroy(): 0.20.2 only.
#   LLM.update_weights / LLM.init_weight_transfer_engine / Worker.update_weights,
#     GPUModelRunner.reload_weights(weights_iterator=...): 0.20.2 only.
#   LLM(swap_space=...), EngineArgs.swap_space / .logits_processor_pattern: 0.14.1 only.
#   LLM.generate(tokenization_kwargs=, mm_processor_kwargs=): 0.20.2 only.
#   SamplingParams(logits_processors=, truncate_prompt_tokens=): 0.14.1 only.
#   WorkerWrapperBase.execute_method: 0.14.1 only.
#   GPUModelRunner.load_model(eep_scale_up=) (0.14.1) vs (load_dummy_weights=) (0.20.2).
