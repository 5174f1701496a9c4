"""Finding a model's files and reading them: weights as (name, tensor) pairs, its config, its tokenizer.

Formats never reach the models: each loader yields Hugging Face parameter names and tensors in HF
layout, whatever the file stored (safetensors as is; GGUF dequantized to float32 and un-permuted).
"""
from pagedserve.loader.gguf import (
    GGUFCheckpoint,
    GGUFTensorInfo,
    gguf_hf_config,
    iter_gguf_weights,
    num_gguf_tensors,
    read_gguf,
)
from pagedserve.loader.safetensors import (
    generation_defaults,
    iter_safetensors_weights,
    load_hf_config,
    num_safetensors_tensors,
)
from pagedserve.loader.source import MODEL_ALIASES, ModelSource, resolve_model
from pagedserve.loader.tokenizer import load_tokenizer

__all__ = [
    "GGUFCheckpoint",
    "GGUFTensorInfo",
    "MODEL_ALIASES",
    "ModelSource",
    "generation_defaults",
    "gguf_hf_config",
    "iter_gguf_weights",
    "iter_safetensors_weights",
    "load_hf_config",
    "load_tokenizer",
    "num_gguf_tensors",
    "num_safetensors_tensors",
    "read_gguf",
    "resolve_model",
]
