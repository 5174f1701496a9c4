"""What a user chooses about the engine: `EngineConfig`, a frozen dataclass whose fields are the flags."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

from pagedserve.config.environment import parse_cpu_list

DEFAULT_MODEL = "smollm2-135m-instruct"

OMP_WAIT_POLICIES = ("auto", "active", "passive")
EXECUTOR_BACKENDS = ("uni", "mp", "ray")
DTYPE_CHOICES = ("auto", "half", "float16", "bfloat16", "float", "float32")
RUNNER_CHOICES = ("auto", "generate", "pooling")
CONVERT_CHOICES = ("auto", "none", "embed")
# vLLM's older --task: generate, or embed (embedding) = --runner pooling --convert embed
TASK_CHOICES = ("auto", "generate", "embed", "embedding")


@dataclass(frozen=True)
class EngineConfig:
    """Everything a user can set about the engine. Each field is a `pagedserve serve` flag."""

    model: str = field(default=DEFAULT_MODEL, metadata={"help": "alias, Hugging Face folder or repo id, or .gguf file"})
    tokenizer: str | None = field(default=None, metadata={"help": "tokenizer folder or repo id (default: the model's)"})
    revision: str | None = field(default=None, metadata={"help": "hub revision to download"})
    download_dir: str | None = field(
        default=None, metadata={"help": "where hub downloads are cached (default: huggingface_hub's cache, "
                                        "$HF_HUB_CACHE or $HF_HOME/hub)"})
    use_modelscope: bool = field(default=False, metadata={"help": "download hub repo ids from ModelScope instead "
                                                                   "of the Hugging Face hub"})
    models_dir: str | None = field(
        default=None, metadata={"help": "models made with `pagedserve create` (default: $PAGEDSERVE_MODELS or "
                                        "~/.local/share/pagedserve/models); given to `serve`, serves them all"})
    dtype: str = field(default="auto", metadata={"help": "compute dtype", "choices": DTYPE_CHOICES})
    device: str = field(default="auto", metadata={"help": "cpu, cuda, cuda:N or auto"})
    max_model_len: int | None = field(default=None, metadata={"help": "context length (default: the model's; "
                                                                      "auto or -1 say so too)", "auto": True})
    block_size: int = field(default=16, metadata={"help": "tokens per KV cache block"})
    kv_cache_space: float | None = field(
        default=None, metadata={"help": "KV cache size in GiB on CPU (default: 30%% of free memory, at most 0.75)"})
    gpu_memory_utilization: float = field(default=0.9, metadata={
        "help": "share of GPU memory to use (CUDA only)",
        "aliases": ("--device-memory-utilization", "--device_memory_utilization")})
    num_kv_blocks: int | None = field(default=None, metadata={"help": "exact number of KV blocks (overrides sizing)",
                                                              "aliases": ("--num-gpu-blocks-override",
                                                                          "--num_gpu_blocks_override")})
    enable_prefix_caching: bool = field(default=True, metadata={"help": "reuse KV blocks of shared prefixes"})
    max_num_seqs: int = field(default=256, metadata={"help": "most sequences in one batch"})
    max_num_batched_tokens: int | None = field(
        default=None, metadata={"help": "token budget of one engine step (default 512 on CPU, 2048 on CUDA)"})
    seed: int = field(default=0, metadata={"help": "seed for requests that give none"})
    enforce_eager: bool = field(default=False, metadata={
        "help": "no CUDA graph capture (vLLM's meaning); on CPU nothing changes: the kernels stay on"})
    disable_cpu_kernels: bool = field(default=False, metadata={
        "help": "plain PyTorch ops only: no fused C++ decode kernels or packed quantized weights (slower; for debugging)"})
    num_threads: int | None = field(default=None, metadata={
        "help": "CPU threads (default: the cores this process may use: its affinity mask, the container's CPU "
                "quota, physical cores)"})
    cpu_threads_bind: str | None = field(default=None, metadata={
        "help": "CPU cores the threads run on: auto (default), all or nobind, or a list like 0-3,8 (one thread "
                "per core listed); of vLLM's per-rank form 0-3|4-7 the first part is used"})
    omp_wait_policy: str = field(default="auto", metadata={
        "choices": OMP_WAIT_POLICIES,
        "help": "how idle OpenMP threads wait between ops: active spins (fastest on an otherwise idle machine), "
                "passive sleeps (several times faster when other processes compete for the cores), auto leaves "
                "the runtime's spin-then-sleep (about as fast as active when idle); applies at start-up only"})
    chat_template: str | None = field(default=None, metadata={"help": "Jinja chat template, as a file or a string"})
    quantization: str | None = field(default=None, metadata={"help": "weight quantization method",
                                                              "aliases": ("-q",)})
    tensor_parallel_size: int = field(default=1, metadata={"help": "tensor parallel ranks",
                                                           "aliases": ("-tp", "--tp", "--tp-size", "--tp_size")})
    pipeline_parallel_size: int = field(default=1, metadata={"help": "pipeline parallel stages",
                                                             "aliases": ("-pp",)})
    data_parallel_size: int = field(default=1, metadata={
        "help": "engine replicas behind the one API server, each a process with its own KV cache and its share "
                "of the cores; requests go to the least-loaded one, or to the one holding their cached prefix",
        "aliases": ("-dp",)})
    enable_lora: bool = field(default=False, metadata={"help": "serve LoRA adapters (PEFT folders) beside the model"})
    max_loras: int = field(default=1, metadata={"help": "most LoRA adapters loaded at once"})
    max_lora_rank: int = field(default=16, metadata={"help": "largest LoRA rank accepted"})
    lora_modules: tuple[str, ...] = field(default=(), metadata={
        "help": "LoRA adapters served at start-up, each name=path or vLLM's JSON "
                "'{\"name\": ..., \"path\": ..., \"base_model_name\": ...}'; needs --enable-lora"})
    runner: str = field(default="auto", metadata={
        "choices": RUNNER_CHOICES,
        "help": "generate text, or pool prompts into embeddings (/v1/embeddings, /api/embed); auto: pooling for "
                "encoders (BERT family), generate otherwise"})
    convert: str = field(default="auto", metadata={
        "choices": CONVERT_CHOICES,
        "help": "embed: serve a generative model as an embedding model (last-token pooling, normalized, unless "
                "its sentence-transformers config says otherwise)"})
    task: str = field(default="auto", metadata={
        "choices": TASK_CHOICES, "help": "vLLM's older spelling: embed = --runner pooling, generate = --runner generate"})
    distributed_executor_backend: str | None = field(default=None, metadata={
        "choices": EXECUTOR_BACKENDS,
        "help": "how the ranks run: uni (one process; the default for one rank), mp (processes on this machine; "
                "the default for more), ray (Ray actors across the cluster's nodes)"})
    distributed_timeout_seconds: int | None = field(default=None, metadata={
        "help": "how long ranks wait for each other (start-up, each step) before failing (default 300)"})
    disable_custom_all_reduce: bool = field(default=False, metadata={
        "help": "tensor-parallel ranks on one machine all-reduce over gloo (loopback TCP) instead of shared memory"})

    def __post_init__(self) -> None:
        if self.dtype not in DTYPE_CHOICES:
            raise ValueError(f"dtype must be one of {', '.join(DTYPE_CHOICES)}, got {self.dtype!r}")
        if self.block_size < 1 or self.block_size > 1024:
            raise ValueError(f"block_size must be in [1, 1024], got {self.block_size}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"max_model_len must be positive, got {self.max_model_len}")
        if self.kv_cache_space is not None and self.kv_cache_space <= 0:
            raise ValueError(f"kv_cache_space must be positive GiB, got {self.kv_cache_space}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.num_kv_blocks is not None and self.num_kv_blocks < 1:
            raise ValueError(f"num_kv_blocks must be positive, got {self.num_kv_blocks}")
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be positive, got {self.max_num_seqs}")
        if self.max_num_batched_tokens is not None and self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be positive, got {self.max_num_batched_tokens}")
        if self.omp_wait_policy not in OMP_WAIT_POLICIES:
            raise ValueError(f"omp_wait_policy must be one of {', '.join(OMP_WAIT_POLICIES)}, "
                             f"got {self.omp_wait_policy!r}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be positive, got {self.num_threads}")
        if self.cpu_threads_bind is not None:
            bound_cpus(self.cpu_threads_bind)   # raises ValueError naming a bad list
        if self.max_loras < 1 or self.max_lora_rank < 1:
            raise ValueError("max_loras and max_lora_rank must be positive")
        if self.lora_modules and not self.enable_lora:
            raise ValueError("--lora-modules needs --enable-lora")
        self.lora_adapters()   # raises ValueError naming a bad entry
        for name, value, choices in (("runner", self.runner, RUNNER_CHOICES), ("convert", self.convert, CONVERT_CHOICES),
                                     ("task", self.task, TASK_CHOICES)):
            if value not in choices:
                raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
        self.runner_choice   # raises ValueError when --runner, --task and --convert disagree
        if self.tensor_parallel_size < 1 or self.pipeline_parallel_size < 1:
            raise ValueError("tensor_parallel_size and pipeline_parallel_size must be positive")
        if self.data_parallel_size < 1:
            raise ValueError(f"data_parallel_size must be positive, got {self.data_parallel_size}")
        if self.data_parallel_size > 1:
            self._check_data_parallel()
        if self.enable_lora and (self.tensor_parallel_size > 1 or self.pipeline_parallel_size > 1):
            # NOTE: adapters are loaded into the driver's model only; the worker ranks would run without them
            raise ValueError("--enable-lora needs tensor_parallel_size 1 and pipeline_parallel_size 1: LoRA "
                             "adapters are not split across ranks here")
        if self.distributed_executor_backend is not None and self.distributed_executor_backend not in EXECUTOR_BACKENDS:
            raise ValueError(f"distributed_executor_backend must be one of {', '.join(EXECUTOR_BACKENDS)}, "
                             f"got {self.distributed_executor_backend!r}")
        if self.distributed_timeout_seconds is not None and self.distributed_timeout_seconds < 1:
            raise ValueError(f"distributed_timeout_seconds must be positive, got {self.distributed_timeout_seconds}")

    def _check_data_parallel(self) -> None:
        """What data parallel replicas cannot (yet) combine with, refused at start-up."""
        if self.tensor_parallel_size > 1 or self.pipeline_parallel_size > 1:
            raise ValueError(f"data_parallel_size {self.data_parallel_size} with tensor_parallel_size "
                             f"{self.tensor_parallel_size} x pipeline_parallel_size {self.pipeline_parallel_size}: "
                             "data parallel replicas run one rank each here; use one or the other")
        if self.distributed_executor_backend == "ray":
            raise ValueError("data parallel replicas are processes on this machine; --distributed-executor-backend "
                             "ray is not supported with data_parallel_size > 1")
        if self.enable_lora:
            # NOTE: an adapter loaded while serving would have to reach every replica at once, and a request
            # for it any of them; not built yet.
            raise ValueError("--enable-lora needs data_parallel_size 1: LoRA adapters are not served by data "
                             "parallel replicas")

    @property
    def runner_choice(self) -> str:
        """--runner with --task and --convert folded in: auto, generate or pooling."""
        implied = {"generate": "generate", "embed": "pooling", "embedding": "pooling"}.get(self.task)
        if self.convert == "embed":
            implied = "pooling"
        if implied is not None and self.runner not in ("auto", implied):
            raise ValueError(f"--runner {self.runner} contradicts --task {self.task} / --convert {self.convert}")
        return implied or self.runner

    def lora_adapters(self) -> list[tuple[str, str, str | None]]:
        """--lora-modules as (name, path, base_model_name): `name=path` or vLLM's JSON form."""
        adapters = []
        for entry in self.lora_modules:
            text = entry.strip()
            if text.startswith("{"):
                try:
                    spec = json.loads(text)
                    adapters.append((str(spec["name"]), str(spec["path"]), spec.get("base_model_name")))
                except (ValueError, KeyError, TypeError):
                    raise ValueError(f"--lora-modules {entry!r}: the JSON form needs \"name\" and \"path\"") from None
                continue
            name, sep, path = text.partition("=")
            if not sep or not name or not path:
                raise ValueError(f"--lora-modules {entry!r}: expected name=path or a JSON object")
            adapters.append((name, path, None))
        return adapters

    def replace(self, **changes: Any) -> EngineConfig:
        return dataclasses.replace(self, **changes)


def bound_cpus(cpu_threads_bind: str | None) -> tuple[int, ...] | None:
    """The cores `cpu_threads_bind` names; None for auto, all and nobind (no binding)."""
    if cpu_threads_bind is None or cpu_threads_bind.strip().lower() in ("", "auto", "all", "nobind"):
        return None
    return parse_cpu_list(cpu_threads_bind.split("|")[0])
