"""pagedserve: LLM inference with a paged KV cache, continuous batching and OpenAI/Ollama-compatible serving."""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# NOTE: resolved on first use, so importing the torch-free core (scheduler, block manager) stays cheap.
_PUBLIC = {
    "LLM": "pagedserve.engine.llm",
    "LoRARequest": "pagedserve.engine.lora",
    "LLMEngine": "pagedserve.engine.llm_engine",
    "SamplingParams": "pagedserve.sampling_params",
    "RequestOutput": "pagedserve.outputs",
    "CompletionOutput": "pagedserve.outputs",
    "Logprob": "pagedserve.outputs",
}
__all__ = list(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'pagedserve' has no attribute {name!r}")
    return getattr(importlib.import_module(_PUBLIC[name]), name)
