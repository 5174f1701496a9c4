"""`pagedserve bench embed`: embeddings per second of the engine (`LLM.embed`), or with `--backend st`
of sentence-transformers' `encode` on the same model folder, the same texts and the same threads.

Each backend embeds every text once to warm up, then `iterations` times; the median run gives the rate.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from pagedserve.config import EngineConfig


def pagedserve_embed(config: EngineConfig, texts: list[str], iterations: int) -> dict[str, Any]:
    from pagedserve.engine.llm import LLM

    llm = LLM(**vars(config))
    num_tokens = sum(len(output.prompt_token_ids) for output in llm.embed(texts))   # also the warm-up

    def run() -> None:
        llm.embed(texts)

    return _embed_report("pagedserve", str(llm.engine.platform.dtype), texts, num_tokens, iterations, run)


def st_embed(config: EngineConfig, texts: list[str], batch_size: int, iterations: int) -> dict[str, Any]:
    from sentence_transformers import SentenceTransformer

    from pagedserve.engine.platform import Platform
    from pagedserve.loader.source import resolve_model

    source = resolve_model(config.model, config.revision, config.download_dir, config.use_modelscope)
    platform = Platform.resolve(config.replace(disable_cpu_kernels=True), None)   # the same torch threads
    model = SentenceTransformer(str(source.path), device=platform.device.type)
    num_tokens = sum(len(ids) for ids in model.tokenizer(texts, truncation=True,
                                                         max_length=model.max_seq_length)["input_ids"])

    def run() -> None:
        model.encode(texts, batch_size=batch_size, convert_to_tensor=True)

    run()   # warm-up
    dtype = str(next(model.parameters()).dtype)
    return {**_embed_report("sentence-transformers", dtype, texts, num_tokens, iterations, run),
            "batch_size": batch_size}


def _embed_report(backend: str, dtype: str, texts: list[str], num_tokens: int, iterations: int,
                  run: Callable[[], None]) -> dict[str, Any]:
    seconds = []
    for _ in range(iterations):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    median = float(torch.tensor(seconds).median())
    return {"backend": backend, "dtype": dtype.removeprefix("torch."), "num_texts": len(texts),
            "input_tokens": num_tokens, "iterations": iterations, "median_s": median,
            "embeddings_per_s": len(texts) / median, "tokens_per_s": num_tokens / median,
            "num_threads": torch.get_num_threads()}
