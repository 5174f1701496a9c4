"""vLLM 0.32's `serve` flags with nothing to act on here, grouped by why. They parse, so a command line
pasted from a guide starts, and each one given logs one line saying why it does nothing.

The flags pagedserve implements are config fields (config/engine.py, config/server.py), and the handful
options.py's ACCEPTED_FLAGS lists carry their own reasons; a name here that becomes a real flag is skipped
when the parser is built, so implementing a flag means adding its config field, nothing else.
tests/data/vllm-0.32.0-serve-flags.json is vLLM's own list; tests/test_vllm_flags.py checks every flag in it parses.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class AcceptedGroup:
    """Flags (dashed names, space-separated) that share a reason."""

    reason: str
    switches: str = ""    # --flag / --no-flag, no value
    values: str = ""      # --flag VALUE
    lists: str = ""       # --flag VALUE [VALUE ...]
    optional: str = ""    # --flag [VALUE]


VLLM_ACCEPTED_GROUPS: tuple[AcceptedGroup, ...] = (
    AcceptedGroup(
        "one machine serves the model behind one HTTP API process (data parallel replicas are local, set by "
        "--data-parallel-size alone; no expert or context parallelism, API server processes, gRPC or multi-node "
        "launch)",
        switches="headless grpc aggregate-engine-logging numa-bind dcp-q-replicate data-parallel-hybrid-lb "
                 "data-parallel-external-lb data-parallel-multi-port-external-lb enable-hc-sp enable-expert-parallel "
                 "enable-batch-sharded-sampling enable-ep-weight-filter enable-dbo enable-shm-tensor-arena "
                 "enable-elastic-ep disable-nccl-for-dp-synchronization enable-eplb ray-workers-use-nsight "
                 "enable-fault-tolerance enable-scale-out",
        values="api-server-count master-addr master-port nnodes node-rank distributed-timeout-seconds "
               "cpu-distributed-timeout-seconds device-ids decode-context-parallel-size dcp-comm-backend "
               "dcp-kv-cache-interleave-size cp-kv-cache-interleave-size prefill-context-parallel-size "
               "data-parallel-size data-parallel-rank data-parallel-start-rank data-parallel-size-local "
               "data-parallel-address data-parallel-rpc-port data-parallel-backend all2all-backend ubatch-size "
               "elastic-ep-max-dp-size dbo-decode-token-threshold dp-sync-interval dbo-prefill-token-threshold "
               "eplb-config expert-placement-strategy worker-cls worker-extension-cls fault-tolerance-config "
               "grpc-port data-parallel-supervisor-port dp-supervisor-probe-interval-s dp-supervisor-probe-timeout-s "
               "dp-supervisor-probe-failure-threshold",
        lists="numa-bind-nodes numa-bind-cpus"),
    AcceptedGroup(
        "there are no CUDA graphs, compilation passes or GPU kernel backends to choose here",
        switches="enable-flashinfer-autotune enable-mamba-cache-stochastic-rounding",
        values="gdn-prefill-backend kda-prefill-backend kda-decode-backend attention-backend mamba-backend "
               "mamba-ssu-algorithm mamba-cache-philox-rounds max-cudagraph-capture-size ir-op-priority moe-backend "
               "linear-backend sparse-indexer-topk-backend compilation-config attention-config kernel-config "
               "optimization-level performance-mode",
        lists="cudagraph-capture-sizes"),
    AcceptedGroup(
        "LoRA tuning for GPUs and multimodal/MoE LoRA (adapters are served in the model's dtype, every "
        "loaded adapter stays resident)",
        switches="enable-tower-connector-lora fully-sharded-loras specialize-active-lora "
                 "enable-mixed-moe-lora-format enable-moe-shared-loras",
        values="lora-dtype max-cpu-loras default-mm-loras max-lora-cls-labels",
        lists="lora-target-modules"),
    AcceptedGroup(
        "the models here take text only: no images, audio or video",
        switches="language-model-only enable-mm-embeds mm-encoder-only interleave-mm-strings skip-mm-profiling "
                 "mm-device-do-normalize trust-request-mm-kwargs disable-chunked-mm-input",
        values="limit-mm-per-prompt media-io-kwargs mm-processor-kwargs mm-processor-cache-gb mm-processor-cache-type "
               "mm-hasher-algorithm mm-shm-cache-max-object-size-mb mm-encoder-tp-mode mm-encoder-attn-backend "
               "mm-encoder-attn-dtype mm-encoder-fp8-scale-path mm-encoder-fp8-scale-save-path "
               "mm-encoder-fp8-scale-save-margin video-pruning-rate video-pruning-method mm-tensor-ipc "
               "mm-processor-device mm-ipc-gpu-memory-gb allowed-local-media-path",
        lists="allowed-media-domains"),
    AcceptedGroup(
        "speculative decoding is not supported",
        values="speculative-config spec-method spec-model spec-tokens"),
    AcceptedGroup(
        "KV cache transfer and offloading, weight offloading and sleep mode are not supported",
        switches="enable-sleep-mode sleep-mode-offload-cudagraph enable-cumem-allocator enable-nccl-comm-suspend",
        values="kv-transfer-config kv-events-config ec-transfer-config ec-manager-config weight-transfer-config "
               "kv-offloading-size kv-offloading-backend offload-backend offload-group-size offload-num-in-group "
               "offload-prefetch-step",
        lists="cpu-offload-params offload-params sleep-preserve-parameter-names"),
    AcceptedGroup(
        "the KV cache has one layout: paged blocks in the compute dtype, sized by --kv-cache-space on CPU and "
        "--gpu-memory-utilization on CUDA",
        switches="kv-sharing-fast-prefill swa-bounded-replay enable-mamba-shared-prefix-checkpoint use-replayssm "
                 "disable-hybrid-kv-cache-manager",
        values="kv-cache-memory-bytes prefix-caching-hash-algo prefix-cache-retention-interval mamba-cache-dtype "
               "mamba-ssm-cache-dtype mamba-block-size prefix-match-unit mamba-cache-mode replayssm-buffer-len",
        lists="kv-cache-dtype-skip-layers"),
    AcceptedGroup(
        "the scheduler has one policy: first come, first served, with chunked prefill within "
        "--max-num-batched-tokens",
        switches="long-prefill-token-threshold-adaptive scheduler-reserve-full-isl async-scheduling",
        values="max-num-scheduled-tokens max-num-active-seqs max-num-queued-reqs max-num-queued-tokens "
               "long-prefill-token-threshold scheduling-policy scheduler-cls watermark prefill-schedule-interval "
               "stream-interval"),
    AcceptedGroup(
        "weights load with the built-in loaders (safetensors, GGUF) and the built-in model classes",
        switches="use-tqdm-on-load allow-deprecated-quantization",
        values="safetensors-load-strategy safetensors-prefetch-num-threads safetensors-prefetch-block-size "
               "model-loader-extra-config pt-load-map-location model-impl model-class-overrides hf-config-path "
               "config-format hf-overrides quantization-config code-revision tokenizer-revision",
        lists="ignore-patterns"),
    AcceptedGroup(
        "models run as text generators with the standard sampler (no pooling, conversion, prompt embeddings, "
        "custom logits processors or plugins)",
        switches="enable-return-routed-experts return-sampling-mask use-fp64-gumbel enable-trace-replay "
                 "disable-sliding-window disable-cascade-attn skip-tokenizer-init enable-prompt-embeds",
        values="runner convert pooler-config io-processor-plugin logprobs-mode renderer-num-workers "
               "diffusion-config engram-config watermark-config aux-output-config additional-config "
               "reasoning-parser-plugin reasoning-config structured-outputs-config",
        lists="logits-processors"),
    AcceptedGroup(
        "tracing, profiling and the extra metrics are not available; /metrics has vLLM's main ones",
        switches="kv-cache-metrics cudagraph-metrics enable-layerwise-nvtx-tracing enable-mfu-metrics "
                 "enable-logging-iteration-details jit-monitor-verbose enable-per-request-metrics "
                 "enable-server-load-tracking",
        values="show-hidden-metrics-for-version otlp-traces-endpoint per-request-spec-decode-metrics "
               "kv-cache-metrics-sample custom-histogram-buckets jit-monitor-mode profiler-config",
        lists="collect-detailed-traces"),
    AcceptedGroup(
        "the HTTP front end has no such option (logging is set with --log-level and VLLM_LOGGING_LEVEL)",
        switches="return-tokens-as-token-ids exclude-tools-when-tool-choice-none enable-force-include-usage "
                 "enable-tokenizer-info-endpoint enable-log-outputs enable-log-deltas cohere-is-reasoning-model "
                 "log-error-stack tokens-only enable-ssl-refresh enable-request-id-headers disable-fastapi-docs "
                 "enable-offline-docs enable-flash-late-interaction fail-on-environ-validation",
        values="tool-parser-plugin tool-strict-level tool-server sse-keep-alive-interval "
               "cohere-format anthropic-disabled-thinking-effort fingerprint-mode fingerprint-value uds "
               "disable-access-log-for-endpoints ssl-ca-certs ssl-cert-reqs ssl-ciphers root-path middleware "
               "h11-max-incomplete-event-size h11-max-header-count logging-config log-config-file"),
    AcceptedGroup(
        "set HF_TOKEN in the environment instead: huggingface_hub reads it for every download",
        optional="hf-token"),
)

# vLLM's one-dash spellings of the flags above (the real flags' ones, -tp -pp -q, are config aliases).
SHORT_ALIASES: dict[str, str] = {
    "api-server-count": "-asc", "nnodes": "-n", "node-rank": "-r", "decode-context-parallel-size": "-dcp",
    "prefill-context-parallel-size": "-pcp", "data-parallel-size": "-dp", "data-parallel-rank": "-dpn",
    "data-parallel-start-rank": "-dpr", "data-parallel-size-local": "-dpl", "data-parallel-address": "-dpa",
    "data-parallel-rpc-port": "-dpp", "data-parallel-backend": "-dpb", "data-parallel-hybrid-lb": "-dph",
    "data-parallel-external-lb": "-dpe", "data-parallel-multi-port-external-lb": "-dpm",
    "enable-expert-parallel": "-ep", "speculative-config": "-sc", "diffusion-config": "-dc",
    "compilation-config": "-cc", "attention-config": "-ac",
}


def vllm_accepted_flags() -> dict[str, tuple[str, str]]:
    """Option name (underscored) -> (kind: switch, value, list or optional; reason)."""
    flags: dict[str, tuple[str, str]] = {}
    for group in VLLM_ACCEPTED_GROUPS:
        for kind, names in (("switch", group.switches), ("value", group.values), ("list", group.lists),
                            ("optional", group.optional)):
            for name in names.split():
                flags[name.replace("-", "_")] = (kind, group.reason)
    return flags
