"""Every vLLM surface the rollfleet runtime touches, declared once, as plain data.

The runtime must work with vLLM 0.14.1 (the image pin), the 0.16 and 0.17 lines (vLLM's own weight
transfer: NCCL from 0.16, IPC and sleep(level=0) from 0.17) and 0.20.2 (the GPU test host).
tests/test_vllm_compat.py reads the real wheels from PyPI (only the needed .py files, never
installed) and checks every `Use` below against each; it also AST-scans src/rollfleet/**/*.py
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
must reach differently per version (it then branches on what it finds, e.g. `dataclasses.fields`), and
for a surface only some lines have (vLLM's native weight transfer). Such a Use must hold in exactly
those versions and fail in the others (the test checks both), so `versions` says which line has what;
each one cites where the wheel's source shows the difference (file:line, per version).

`params` reads like the call site's view of a signature: names before "*" are passed positionally,
in that order; names after "*" by keyword; "**" means the runtime relies on a **kwargs catch-all
(`kwargs_to` names the class whose fields that catch-all forwards to, e.g. LLM -> EngineArgs).
The check also fails when the callable has a required parameter the runtime does not pass.
"""

from __future__ import annotations

from dataclasses import dataclass

# The vLLM versions the runtime supports: the image pin, the first line with vLLM's own weight
# transfer (0.16, NCCL), the first with its IPC backend and sleep(level=0) (0.17), the GPU test host's.
VERSIONS = ("0.14.1", "0.16.0", "0.17.1", "0.20.2")

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


# AsyncEngineArgs(...) (a dataclass extending EngineArgs): the engine arguments engine.py passes.
ENGINE_ARGS = (
    "model", "tokenizer", "revision", "dtype", "seed", "tensor_parallel_size", "gpu_memory_utilization",
    "enable_prefix_caching", "enforce_eager", "max_model_len", "max_num_seqs", "distributed_executor_backend",
    "worker_extension_cls", "disable_log_stats", "enable_sleep_mode",
    "load_format",  # not passed by engine.py (may come via vllm.extraEngineArgs; the benchmarks use it)
)
# SamplingParams(...) keywords (a msgspec.Struct: class-level annotated fields): rollout.SAMPLING_DEFAULTS
# minus nothing, plus output_kind.
SAMPLING_PARAMS = ("n", "temperature", "top_p", "top_k", "min_p", "max_tokens", "min_tokens", "stop", "stop_token_ids",
                   "seed", "logprobs", "repetition_penalty", "ignore_eos", "include_stop_str_in_output",
                   "skip_special_tokens", "output_kind")

_ASYNC = "vllm.v1.engine.async_llm"
_SP = "vllm.sampling_params"
_OUT = "vllm.outputs"
_DU = "vllm.distributed.utils"
_NCCL = "vllm.distributed.device_communicators.pynccl"
_LLM = "vllm.entrypoints.llm"
_CORE = "vllm.v1.engine.core"
_WORKER = "vllm.v1.worker.gpu_worker"
_WT = "vllm.distributed.weight_transfer"
_WTC = "vllm.config.weight_transfer"
_WTB, _WTN, _WTI, _WTP = f"{_WT}.base", f"{_WT}.nccl_engine", f"{_WT}.ipc_engine", f"{_WT}.packed_tensor"
_FROM_016 = ("0.16.0", "0.17.1", "0.20.2")  # vLLM's NCCL weight-transfer engine
_FROM_017 = ("0.17.1", "0.20.2")  # + the IPC engine, sleep(level=0) / wake_up(tags=["scheduling"])

USES: tuple[Use, ...] = (
    Use(EXPORT, "vllm", "SamplingParams"),
    Use(EXPORT, "vllm", "AsyncLLMEngine"),  # = AsyncLLM in both versions (the name DESIGN.md §7 cites)
    # the engine: AsyncLLM on the actor's own asyncio loop
    Use(EXPORT, "vllm.engine.arg_utils", "AsyncEngineArgs"),
    Use(CALL, "vllm.engine.arg_utils", "AsyncEngineArgs", ("*", *ENGINE_ARGS[:-1])),
    *(Use(FIELD, "vllm.engine.arg_utils", f"EngineArgs.{name}") for name in ENGINE_ARGS),
    Use(EXPORT, _ASYNC, "AsyncLLM"),
    Use(STATIC, _ASYNC, "AsyncLLM.from_engine_args", ("engine_args", "start_engine_loop", "usage_context",
                                                        "stat_loggers")),
    Use(EXPORT, "vllm.v1.metrics.ray_wrappers", "RayPrometheusStatLogger"),  # vLLM's metrics via ray.util.metrics
    Use(EXPORT, "vllm.v1.metrics.ray_wrappers", "ray_metrics"),  # None where `from ray import serve` failed
    Use(CALL, _ASYNC, "AsyncLLM.generate", ("prompt", "sampling_params", "request_id")),
    Use(CALL, _ASYNC, "AsyncLLM.collective_rpc", ("method", "*", "timeout", "args")),
    Use(CALL, _ASYNC, "AsyncLLM.reset_prefix_cache", ("*", "reset_running_requests")),
    Use(CALL, _ASYNC, "AsyncLLM.shutdown"),
    Use(ATTR, _ASYNC, "AsyncLLM.model_config", where=("__init__",)),
    Use(FIELD, "vllm.config", "ModelConfig.max_model_len"),
    Use(CALL, "vllm.config", "ModelConfig.get_vocab_size"),  # the client's bound on token ids
    Use(ATTR, _ASYNC, "AsyncLLM.errored"),  # the engine core died (engine.py VllmCore.failure)
    # sync.inflight abort / keep interrupt a sample with abort(request ids): the output processor puts a
    # final output with finish_reason "abort" and the tokens it had into the request's queue, which the
    # running generate() yields (FINAL_ONLY keeps every token so far): engine.py Scheduler._pause
    Use(CALL, _ASYNC, "AsyncLLM.abort", ("request_id",)),
    Use(SOURCE, "vllm.v1.engine.output_processor", "OutputProcessor.abort_requests",
        values=("FinishReason.ABORT", "req_state.queue.put(", "external_req_ids")),
    Use(SOURCE, "vllm.v1.engine.output_processor", "RequestState._new_completion_output",
        values=("token_ids = self.detokenizer.output_token_ids",)),
    # cancelling AsyncLLM.generate aborts the request in vLLM (engine.py aborts by cancelling tasks)
    Use(SOURCE, _ASYNC, "AsyncLLM.generate", values=("asyncio.CancelledError", "await self.abort(")),
    # reset_prefix_cache(reset_running_requests=True) preempts running requests: their KV is recomputed
    # with the new weights (sync.inflight: keep)
    Use(SOURCE, "vllm.v1.core.sched.scheduler", "Scheduler.reset_prefix_cache",
        values=("reset_running_requests", "_preempt_request")),
    # collective_rpc(callable): the engine core runs a function in each worker (Fleet.call, benchmarks)
    Use(SOURCE, "vllm.v1.serial_utils", values=("cloudpickle", "FunctionType", "VLLM_ALLOW_INSECURE_SERIALIZATION")),
    # prompts are {"prompt_token_ids": [...], "cache_salt": "..."}: a TokensPrompt as a plain dict. Its keys
    # are TypedDict fields, `cache_salt` inherited from _PromptOptions from 0.16 on (the module moved from
    # vllm.inputs.data to vllm.inputs.llm in 0.20: see DIFFERENCES); vllm.inputs exports it in all four
    Use(EXPORT, "vllm.inputs", "TokensPrompt"),
    Use(FIELD, "vllm.inputs", "TokensPrompt.prompt_token_ids"),
    Use(FIELD, "vllm.inputs", "TokensPrompt.cache_salt"),
    # executor backend and the worker extension (worker_extension_cls="rollfleet.runtime.ext...")
    Use(LITERALS, "vllm.config", "ParallelConfig.distributed_executor_backend", values=("uni", "mp")),
    Use(FIELD, "vllm.config", "ParallelConfig.worker_extension_cls"),
    Use(SOURCE, "vllm.v1.worker.worker_base", "WorkerWrapperBase.init_worker", values=("worker_extension_cls",)),
    # sampling and outputs: one engine request per sample, final output only
    Use(CALL, _SP, "SamplingParams", ("*", *SAMPLING_PARAMS)),
    *(Use(FIELD, _SP, f"SamplingParams.{name}") for name in SAMPLING_PARAMS),
    Use(EXPORT, _SP, "RequestOutputKind"),
    Use(FIELD, _SP, "RequestOutputKind.FINAL_ONLY"),
    Use(ATTR, _OUT, "RequestOutput.outputs"),
    Use(ATTR, _OUT, "CompletionOutput.text"),
    Use(ATTR, _OUT, "CompletionOutput.token_ids"),
    Use(ATTR, _OUT, "CompletionOutput.logprobs"),
    Use(ATTR, _OUT, "CompletionOutput.finish_reason"),
    Use(FIELD, "vllm.logprobs", "Logprob.logprob"),
    # weight sync transport (sync.py): StatelessProcessGroup + PyNcclCommunicator.
    # The dataclass has a required `socket` field up to 0.17 (vllm/distributed/utils.py:155 in 0.14.1,
    # :154 in 0.16.0 and 0.17.1) that 0.20 dropped (0.20.2's class, utils.py:167, has none):
    # sync.make_transport passes socket=None only where `dataclasses.fields` shows it
    Use(CALL, _DU, "StatelessProcessGroup", ("*", "rank", "world_size", "store", "socket"),
        versions=("0.14.1", "0.16.0", "0.17.1")),
    Use(CALL, _DU, "StatelessProcessGroup", ("*", "rank", "world_size", "store"), versions=("0.20.2",)),
    *(Use(FIELD, _DU, f"StatelessProcessGroup.{name}") for name in ("rank", "world_size", "store")),
    Use(CALL, _NCCL, "PyNcclCommunicator.__init__", ("group", "*", "device")),
    Use(CALL, _NCCL, "PyNcclCommunicator.broadcast", ("tensor", "*", "src", "stream")),
    # a push that failed aborts the communicator (ncclCommAbort through the wrapper's own ctypes library:
    # the wrapper declares ncclCommDestroy, not ncclCommAbort; sync.py NcclTransport.abort)
    Use(ATTR, _NCCL, "PyNcclCommunicator.nccl", where=("__init__",)),
    Use(ATTR, _NCCL, "PyNcclCommunicator.comm", where=("__init__",)),
    Use(ATTR, "vllm.distributed.device_communicators.pynccl_wrapper", "NCCLLibrary.lib", where=("__init__",)),
    # inside the GPU worker (ext.py: methods of the worker extension run as the Worker)
    Use(ATTR, "vllm.v1.worker.gpu_worker", "Worker.device", where=("init_device",)),
    Use(ATTR, "vllm.v1.worker.gpu_worker", "Worker.model_runner", where=("init_device",)),
    Use(ATTR, "vllm.v1.worker.gpu_model_runner", "GPUModelRunner.model"),
    Use(ATTR, "vllm.v1.worker.gpu.model_runner", "GPUModelRunner.model"),  # VLLM_USE_V2_MODEL_RUNNER=1
    Use(CALL, "vllm.model_executor.models.qwen2", "Qwen2ForCausalLM.load_weights", ("*", "weights")),

    # ---- sleep mode: the colocated layout (engine.py VllmCore.sleep / wake_up; level 2, then "weights",
    # then "kv_cache": the order that is safe on every line, the scheduler held by rollfleet's admission gate)
    Use(CALL, _ASYNC, "AsyncLLM.sleep", ("level",)),
    Use(CALL, _ASYNC, "AsyncLLM.wake_up", ("tags",)),
    Use(CALL, _ASYNC, "AsyncLLM.is_sleeping"),
    # sleep(level, mode=...) with the pause modes: 0.17 on (async_llm.py:906 in 0.17.1, :902 in 0.20.2;
    # 0.16.0's :939 and 0.14.1's :755 take only `level`)
    Use(CALL, _ASYNC, "AsyncLLM.sleep", ("level", "*", "mode"), versions=_FROM_017),
    # sleep(level=0) pauses scheduling only and wake_up(tags=["scheduling"]) resumes it: 0.17 on
    # (vllm/v1/engine/core.py:643-660 / :681-695 in 0.17.1, :673-690 / :711-725 in 0.20.2). Before, the
    # engine core hands any level to the worker (core.py:616 in 0.16.0, :569 in 0.14.1), whose sleep()
    # treats every level but 1 as 2 (gpu_worker.py:135 in 0.16.0, :122 in 0.14.1): level 0 there drops
    # the weights. So the colocated mode detects level 0 by this source, never by passing it.
    Use(SOURCE, _CORE, "EngineCore.sleep", values=("level < 1", "pause_scheduler"), versions=_FROM_017),
    Use(SOURCE, _CORE, "EngineCore.wake_up", values=('"scheduling"', "resume_scheduler"), versions=_FROM_017),

    # ---- vLLM's native weight transfer (not used by the runtime yet: the native transfer path, issue 16)
    # The NCCL engine, 0.16 on: vllm/distributed/weight_transfer/ (absent in 0.14.1), chosen by
    # EngineArgs.weight_transfer_config (arg_utils.py:590 in 0.16.0, :608 in 0.17.1, :674 in 0.20.2), a
    # WeightTransferConfig (vllm/config/weight_transfer.py:9; exported by vllm/config/__init__.py:51 in 0.16.0)
    Use(MODULE, _WT, versions=_FROM_016),
    Use(EXPORT, "vllm.config", "WeightTransferConfig", versions=_FROM_016),
    Use(CALL, _WTC, "WeightTransferConfig", ("*", "backend"), versions=_FROM_016),
    Use(LITERALS, _WTC, "WeightTransferConfig.backend", values=("nccl",), versions=_FROM_016),
    Use(FIELD, "vllm.engine.arg_utils", "EngineArgs.weight_transfer_config", versions=_FROM_016),
    # the request classes (weight_transfer/base.py:40, :47) and the calls taking them: AsyncLLM's raise
    # TypeError on a plain dict (async_llm.py:1073-1076 / :1090-1095 in 0.16.0), LLM's take either
    # (llm.py:1951 / :1968 in 0.16.0, :2012 / :2029 in 0.17.1, :1894 / :1911 in 0.20.2)
    Use(CALL, _WTB, "WeightTransferInitRequest", ("*", "init_info"), versions=_FROM_016),
    Use(CALL, _WTB, "WeightTransferUpdateRequest", ("*", "update_info"), versions=_FROM_016),
    Use(CALL, _ASYNC, "AsyncLLM.init_weight_transfer_engine", ("request",), versions=_FROM_016),
    Use(CALL, _ASYNC, "AsyncLLM.update_weights", ("request",), versions=_FROM_016),
    Use(CALL, _LLM, "LLM.init_weight_transfer_engine", ("request",), versions=_FROM_016),
    Use(CALL, _LLM, "LLM.update_weights", ("request",), versions=_FROM_016),
    # in each worker, reached by collective_rpc(..., kwargs={"init_info"/"update_info": dict}):
    # gpu_worker.py:950 / :967 in 0.16.0, :855 / :872 in 0.17.1, :941 / :958 in 0.20.2
    Use(CALL, _WORKER, "Worker.init_weight_transfer_engine", ("init_info",), versions=_FROM_016),
    Use(CALL, _WORKER, "Worker.update_weights", ("update_info",), versions=_FROM_016),
    Use(FIELD, _WTB, "WeightTransferUpdateInfo.is_checkpoint_format", versions=_FROM_016),
    # the NCCL backend's init / update dicts (nccl_engine.py:29 / :39 in 0.16.0, :29 / :65 from 0.17) and
    # its packed format: buffers of 1 GiB, 2 of them by default (packed_tensor.py:13-14 in all three)
    Use(CALL, _WTN, "NCCLWeightTransferInitInfo", ("*", "master_address", "master_port", "rank_offset", "world_size"),
        versions=_FROM_016),
    Use(CALL, _WTN, "NCCLWeightTransferUpdateInfo", ("*", "names", "dtype_names", "shapes", "packed",
                                                     "packed_buffer_size_bytes", "packed_num_buffers",
                                                     "is_checkpoint_format"), versions=_FROM_016),
    Use(STATIC, _WTN, "NCCLWeightTransferEngine.trainer_init", ("init_info",), versions=_FROM_016),
    Use(EXPORT, _WTP, "packed_broadcast_producer", versions=_FROM_016),
    Use(EXPORT, _WTP, "packed_broadcast_consumer", versions=_FROM_016),
    # the trainer's send: keyword arguments in 0.16 (nccl_engine.py:187-196 in 0.16.0), one `trainer_args`
    # dict or NCCLTrainerSendWeightsArgs from 0.17 (nccl_engine.py:39 and :213-215 in 0.17.1, :214-216 in 0.20.2)
    Use(STATIC, _WTN, "NCCLWeightTransferEngine.trainer_send_weights",
        ("iterator", "group", "*", "src", "packed", "stream", "packed_buffer_size_bytes", "packed_num_buffers"),
        versions=("0.16.0",)),
    Use(STATIC, _WTN, "NCCLWeightTransferEngine.trainer_send_weights", ("iterator", "trainer_args"),
        versions=_FROM_017),
    Use(CALL, _WTN, "NCCLTrainerSendWeightsArgs",
        ("*", "group", "src", "packed", "stream", "packed_buffer_size_bytes", "packed_num_buffers"),
        versions=_FROM_017),
    # The IPC engine, 0.17 on: config/weight_transfer.py:12 admits "ipc" (0.16.0's only "nccl"),
    # factory.py:118-122 registers ipc_engine.py (IPCWeightTransferUpdateInfo: ipc_engine.py:53 in 0.17.1,
    # :54 in 0.20.2; IPCTrainerSendWeightsArgs: :25 / :26; trainer_send_weights: :195 / :203)
    Use(LITERALS, _WTC, "WeightTransferConfig.backend", values=("nccl", "ipc"), versions=_FROM_017),
    Use(MODULE, _WTI, versions=_FROM_017),
    Use(CALL, _WTI, "IPCWeightTransferInitInfo", versions=_FROM_017),  # no fields: nothing to set up
    Use(CALL, _WTI, "IPCWeightTransferUpdateInfo", ("*", "names", "dtype_names", "shapes", "ipc_handles",
                                                    "ipc_handles_pickled", "is_checkpoint_format"), versions=_FROM_017),
    *(Use(FIELD, _WTI, f"IPCWeightTransferUpdateInfo.{name}", versions=_FROM_017)
      for name in ("names", "dtype_names", "shapes", "ipc_handles", "ipc_handles_pickled")),
    Use(STATIC, _WTI, "IPCWeightTransferEngine.trainer_send_weights", ("iterator", "trainer_args"), versions=_FROM_017),
    Use(CALL, _WTI, "IPCTrainerSendWeightsArgs", ("*", "mode", "llm_handle", "url"), versions=_FROM_017),
)

# Known differences between the four versions next to these surfaces (kept true by
# tests/test_vllm_compat.py DIFFERENCES, which cites file:line) -- do not rely on them without a
# per-version `versions=` split:
#   StatelessProcessGroup(rank=, world_size=, store=): up to 0.17 it also requires `socket` (None is fine
#     for a group that does not own the listening socket); 0.20 has no `socket` field at all.
#   StatelessProcessGroup.broadcast/.send/.recv/.all_reduce (tensors): 0.17 on. .create(listen_socket=...):
#     0.20 only. PyNcclCommunicator.destroy(): 0.20 only.
#   TokensPrompt: vllm/inputs/data.py up to 0.17, vllm/inputs/llm.py in 0.20 (`from vllm.inputs import`
#     works in all); `cache_salt` comes from a _PromptOptions base from 0.16 on.
#   AsyncLLM.sleep() resets the prefix cache itself in 0.14/0.16; from 0.17 the engine core's
#     pause_scheduler(clear_cache=level >= 1) does, so sleep(level=0) keeps it.
#   AsyncLLM.pause_generation(mode="abort"|"wait"|"keep"): 0.16 on (0.14.1: wait_for_inflight_requests=).
#   AsyncLLM.shutdown(timeout=): 0.20 only.
#   The native transfer: Worker.update_weights synchronizes the device after receiving only in 0.20
#     (the NCCL receive is asynchronous); IPCWeightTransferUpdateInfo(ipc_handles_pickled=...) needs
#     VLLM_ALLOW_INSECURE_SERIALIZATION=1 only in 0.20; the NCCL engine's worker rank uses
#     parallel_config.data_parallel_rank up to 0.17, .data_parallel_index in 0.20.
#   GPUModelRunner.reload_weights(weights_iterator=...): 0.16 on.
#   LLM(swap_space=...), EngineArgs.swap_space: up to 0.17. EngineArgs.logits_processor_pattern: 0.14/0.16.
#   LLM.generate(tokenization_kwargs=, mm_processor_kwargs=): 0.16 on.
#   SamplingParams(logits_processors=, truncate_prompt_tokens=): 0.14/0.16.
#   WorkerWrapperBase.execute_method: up to 0.17.
#   GPUModelRunner.load_model(eep_scale_up=) (0.14/0.16) vs (load_dummy_weights=) (0.17 on).
