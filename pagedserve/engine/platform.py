"""Where the engine runs: device, compute dtype, threads and memory budgets, resolved once at start."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from pagedserve.config import EngineConfig
from pagedserve.config.engine import bound_cpus
from pagedserve.engine.host_limits import available_memory, default_num_threads

logger = logging.getLogger(__name__)

GiB = 1 << 30
# Default CPU KV budget: a share of available memory, capped so a small model stays small. The cap
# holds 17k tokens of SmolLM2 (64 requests of 256 tokens at once) and keeps the whole server, runtime
# and weights included, under 1.5 GB; --kv-cache-space sets any other size.
_DEFAULT_KV_SHARE = 0.3
_DEFAULT_KV_CAP = 3 * GiB // 4

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32,
           "float": torch.float32, "half": torch.float16}


@dataclass(frozen=True)
class Platform:
    device: torch.device
    dtype: torch.dtype
    num_threads: int
    # Fused C++ kernels and packed quantized weights: float32 on CPU, unless --disable-cpu-kernels.
    use_cpu_kernels: bool = False

    @property
    def is_cpu(self) -> bool:
        return self.device.type == "cpu"

    def describe(self) -> str:
        """The device as the start-up line names it, e.g. "cpu (2 threads, OpenMP wait passive)"."""
        if not self.is_cpu:
            return str(self.device)
        policy = os.environ.get("OMP_WAIT_POLICY", "").lower() or "auto"
        threads = f"{self.num_threads} thread{'s' if self.num_threads != 1 else ''}"
        return f"cpu ({threads}, OpenMP wait {policy})"

    @classmethod
    def resolve(cls, config: EngineConfig, checkpoint_dtype: str | None, is_quantized: bool = False) -> Platform:
        """`is_quantized`: the checkpoint holds quantized blocks (a GGUF), which the CPU kernels keep
        packed and multiply with float32 activations."""
        device = _resolve_device(config.device)
        dtype = _resolve_dtype(config.dtype, checkpoint_dtype, device, is_quantized and not config.disable_cpu_kernels)
        cores = bound_cpus(config.cpu_threads_bind)
        num_threads = config.num_threads or (len(cores) if cores else default_num_threads())
        use_kernels = False
        if device.type == "cpu":
            if cores:
                _bind_threads(cores)
            torch.set_num_threads(num_threads)
            _check_omp_wait_policy(config.omp_wait_policy)
            if dtype == torch.float32 and not config.disable_cpu_kernels:
                from pagedserve.kernels import cpu_kernels_available

                use_kernels = cpu_kernels_available()
        return cls(device, dtype, num_threads, use_kernels)

    def kv_cache_bytes(self, config: EngineConfig) -> int:
        """Bytes to give the KV cache (after the weights are loaded)."""
        if self.is_cpu:
            if config.kv_cache_space is not None:
                return int(config.kv_cache_space * GiB)
            # NOTE: under a cgroup memory limit (a container), what is free below the limit.
            return int(min(_DEFAULT_KV_CAP, available_memory() * _DEFAULT_KV_SHARE))
        free, total = torch.cuda.mem_get_info(self.device)
        used = total - free
        return max(int(total * config.gpu_memory_utilization) - used, 0)


def _bind_threads(cores: tuple[int, ...]) -> None:
    """Run every thread of this process (and so the OpenMP threads they start) on `cores` only."""
    try:
        for thread_id in os.listdir("/proc/self/task"):
            os.sched_setaffinity(int(thread_id), cores)
    except (OSError, ValueError) as error:
        raise ValueError(f"cannot bind threads to CPUs {','.join(map(str, cores))} "
                         f"(allowed: {','.join(map(str, sorted(os.sched_getaffinity(0))))}): {error}") from error
    logger.info("threads bound to CPUs %s", ",".join(map(str, cores)))


def _check_omp_wait_policy(policy: str) -> None:
    if policy != "auto" and os.environ.get("OMP_WAIT_POLICY", "").lower() != policy:
        logger.warning("omp_wait_policy=%s cannot apply: OpenMP had started before it was set; start the process "
                       "with OMP_WAIT_POLICY=%s in its environment instead", policy, policy.upper())


def cpu_has_fast_bf16() -> bool:
    """True when the CPU does bf16 matmuls natively (AVX512-BF16 or AMX); otherwise bf16 is emulated
    and several times slower than float32."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} was asked for, but no CUDA device is available")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"unsupported device {name!r}; use cpu, cuda or auto")
    return device


def _resolve_dtype(name: str, checkpoint_dtype: str | None, device: torch.device, is_packed: bool) -> torch.dtype:
    if device.type == "cpu":
        # NOTE: packed quantized weights are multiplied with float32 activations by the CPU kernels;
        # bfloat16 would turn the kernels off and dequantize every weight (slower, and greedy outputs
        # would then depend on how a prompt was chunked).
        fast_bf16 = cpu_has_fast_bf16() and not is_packed
        if name == "auto":
            return torch.bfloat16 if fast_bf16 else torch.float32
        if name in ("half", "float16"):
            chosen = torch.bfloat16 if fast_bf16 else torch.float32
            logger.info("dtype %s is not supported on CPU; using %s instead", name, str(chosen).removeprefix("torch."))
            return chosen
        return _DTYPES[name]
    if name == "auto":
        checkpoint = _DTYPES.get(checkpoint_dtype or "", torch.float32)
        return torch.bfloat16 if checkpoint == torch.float32 else checkpoint
    return _DTYPES[name]
