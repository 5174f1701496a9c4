"""`pagedserve bench throughput` and `bench latency`: the engine alone, no HTTP.

`--backend hf` runs the same prompts through Hugging Face transformers' `generate` (batched, greedy,
left-padded) on the same weights, so the two numbers come from one command on one machine.
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
        width = max(len(p.token_ids) for p in batch)
        input_ids = torch.tensor([[0] * (width - len(p.token_ids)) + p.token_ids for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p.token_ids)) + [1] * len(p.token_ids) for p in batch], device=device)
        max_new = max(p.output_len for p in batch)
        with torch.inference_mode():
            out = model.generate(input_ids, attention_mask=mask, max_new_tokens=max_new, min_new_tokens=max_new,
                                 do_sample=False, pad_token_id=0)
        num_output += (out.shape[1] - width) * len(batch)
    elapsed = time.perf_counter() - start
    return _throughput_report("transformers", prompts, num_output, elapsed)


def pagedserve_latency(config: EngineConfig, prompts: list[BenchPrompt], iterations: int) -> dict[str, Any]:
    """One batch (all prompts) end to end, `iterations` times after a warm-up."""
    from pagedserve.engine.llm import LLM

    llm = LLM(**vars(config))
    params = SamplingParams(temperature=0.0, max_tokens=prompts[0].output_len, ignore_eos=True)
    llm.generate([prompts[0].token_ids], SamplingParams(temperature=0.0, max_tokens=2))
    latencies = []
    for _ in tqdm(range(iterations), desc="Iterations"):
        start = time.perf_counter()
        llm.generate([p.token_ids for p in prompts], params)
        latencies.append(time.perf_counter() - start)
    latencies_t = torch.tensor(latencies)
    return {"backend": "pagedserve", "batch_size": len(prompts), "input_len": len(prompts[0].token_ids),
            "output_len": prompts[0].output_len, "iterations": iterations,
            "avg_latency_s": float(latencies_t.mean()), "median_latency_s": float(latencies_t.median()),
            "p99_latency_s": float(torch.quantile(latencies_t, 0.99)),
            "decode_tokens_per_s": len(prompts) * prompts[0].output_len / float(latencies_t.mean())}


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
