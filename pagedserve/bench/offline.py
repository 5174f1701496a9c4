"""`pagedserve bench throughput` and `bench latency`: the engine alone, no HTTP.

`--backend hf` runs the same prompts through Hugging Face transformers' `generate` (batched, greedy,
left-padded) on the same weights, so the two numbers come from one command on one machine: e.g. MoE
decode at batch 1 and 16 (`bench latency --num-prompts 16`) as a ratio to transformers.
"""
from __future__ import annotations

import time
from typing import Any

import torch
from tqdm.auto import tqdm

from pagedserve.bench.datasets import BenchPrompt
from pagedserve.config import EngineConfig
from pagedserve.sampling_params import SamplingParams


def pagedserve_throughput(config: EngineConfig, prompts: list[BenchPrompt]) -> dict[str, Any]:
    """All prompts at once through the engine; greedy, EOS ignored so every request runs its full length."""
    from pagedserve.engine.llm import LLM

    llm = LLM(**vars(config))
    params = [SamplingParams(temperature=0.0, max_tokens=p.output_len, ignore_eos=True) for p in prompts]
    llm.generate([prompts[0].token_ids], SamplingParams(temperature=0.0, max_tokens=2))   # warm-up
    start = time.perf_counter()
    outputs = llm.generate([p.token_ids for p in prompts], params, use_tqdm=True)
    elapsed = time.perf_counter() - start
    num_output = sum(len(o.outputs[0].token_ids) for o in outputs)
    return _throughput_report("pagedserve", prompts, num_output, elapsed)


def hf_throughput(config: EngineConfig, prompts: list[BenchPrompt], batch_size: int) -> dict[str, Any]:
    """The same prompts through transformers' generate, `batch_size` at a time."""
    model, device = _hf_model(config)
    num_output = 0
    start = time.perf_counter()
    for first in tqdm(range(0, len(prompts), batch_size), desc="transformers batches"):
        batch = prompts[first:first + batch_size]
        num_output += _hf_generate(model, device, batch, max(p.output_len for p in batch))
    elapsed = time.perf_counter() - start
    return _throughput_report("transformers", prompts, num_output, elapsed)


def pagedserve_latency(config: EngineConfig, batches: list[list[BenchPrompt]]) -> dict[str, Any]:
    """One batch end to end per iteration, and the same-shaped batch with one output token (its prefill),
    after a warm-up. `batches`: the warm-up, then a whole and a prefill-only batch per iteration, each
    with prompts of its own so that none comes from the prefix cache."""
    from pagedserve.engine.llm import LLM

    llm = LLM(**vars(config))

    def run(prompts: list[BenchPrompt], max_tokens: int) -> float:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        start = time.perf_counter()
        llm.generate([p.token_ids for p in prompts], params)
        return time.perf_counter() - start

    return {**_latency_report("pagedserve", batches, run), "dtype": str(llm.engine.platform.dtype).removeprefix("torch.")}


def hf_latency(config: EngineConfig, batches: list[list[BenchPrompt]]) -> dict[str, Any]:
    """The same batches through transformers' generate on the same weights (greedy, EOS ignored)."""
    model, device = _hf_model(config)

    def run(prompts: list[BenchPrompt], max_tokens: int) -> float:
        start = time.perf_counter()
        _hf_generate(model, device, prompts, max_tokens)
        return time.perf_counter() - start

    return {**_latency_report("transformers", batches, run), "dtype": str(model.dtype).removeprefix("torch.")}


def _latency_report(backend: str, batches: list[list[BenchPrompt]], run) -> dict[str, Any]:
    """decode_tokens_per_s: the tokens after the first of each sequence over the time after prefill
    (whole batch minus the prefill-only batch), what a batch of that size decodes per second."""
    first = batches[0]
    batch_size, output_len = len(first), first[0].output_len
    run(first, 2)   # warm-up
    latencies, prefills = [], []
    for index in tqdm(range((len(batches) - 1) // 2), desc="Iterations"):
        latencies.append(run(batches[1 + 2 * index], output_len))
        prefills.append(run(batches[2 + 2 * index], 1))
    latencies_t, prefills_t = torch.tensor(latencies), torch.tensor(prefills)
    decode_s = float(latencies_t.median() - prefills_t.median())
    return {"backend": backend, "batch_size": batch_size, "input_len": len(first[0].token_ids),
            "output_len": output_len, "iterations": len(latencies),
            "avg_latency_s": float(latencies_t.mean()), "median_latency_s": float(latencies_t.median()),
            "p99_latency_s": float(torch.quantile(latencies_t, 0.99)),
            "median_prefill_s": float(prefills_t.median()), "num_threads": torch.get_num_threads(),
            "decode_tokens_per_s": batch_size * (output_len - 1) / decode_s if decode_s > 0 else 0.0}


def _hf_generate(model, device, prompts: list[BenchPrompt], max_new: int) -> int:
    """One left-padded greedy batch of exactly `max_new` tokens per prompt; the number of tokens made."""
    width = max(len(p.token_ids) for p in prompts)
    input_ids = torch.tensor([[0] * (width - len(p.token_ids)) + p.token_ids for p in prompts], device=device)
    mask = torch.tensor([[0] * (width - len(p.token_ids)) + [1] * len(p.token_ids) for p in prompts], device=device)
    with torch.inference_mode():
        out = model.generate(input_ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new,
                             do_sample=False, pad_token_id=0)
    return (out.shape[1] - width) * len(prompts)


def _throughput_report(backend: str, prompts: list[BenchPrompt], num_output: int, elapsed: float) -> dict[str, Any]:
    num_input = sum(len(p.token_ids) for p in prompts)
    return {"backend": backend, "num_prompts": len(prompts), "elapsed_s": elapsed,
            "requests_per_s": len(prompts) / elapsed, "output_tokens_per_s": num_output / elapsed,
            "total_tokens_per_s": (num_input + num_output) / elapsed, "output_tokens": num_output}


def _hf_model(config: EngineConfig):
    """transformers' own load of the same checkpoint (GGUF dequantized by transformers)."""
    from transformers import AutoModelForCausalLM

    from pagedserve.loader.source import resolve_model
    from pagedserve.engine.platform import Platform

    source = resolve_model(config.model, config.revision, config.download_dir, config.use_modelscope)
    platform = Platform.resolve(config.replace(disable_cpu_kernels=True), None)
    kwargs: dict[str, Any] = {"dtype": platform.dtype}
    if source.kind == "gguf":
        model = AutoModelForCausalLM.from_pretrained(source.path.parent, gguf_file=source.path.name, **kwargs)
    else:
        model = AutoModelForCausalLM.from_pretrained(source.path, **kwargs)
    return model.to(platform.device).eval(), platform.device
