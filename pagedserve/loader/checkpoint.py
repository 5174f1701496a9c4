"""One entry point from a model name to everything the engine needs: config, tokenizer, weights."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from pagedserve.config import EngineConfig, ModelConfig
from pagedserve.config.pooler import PoolerConfig
from pagedserve.layers.quant import PackedWeight
from pagedserve.loader.gguf import gguf_hf_config, iter_gguf_weights, num_gguf_tensors, read_gguf
from pagedserve.loader.hf_quant import (QUANTIZATION_ALIASES, QUANTIZATION_METHODS, int4_quantization,
                                        iter_int4_weights)
from pagedserve.loader.pytorch_bin import bin_files, iter_bin_weights, num_bin_tensors
from pagedserve.loader.safetensors import (generation_defaults, has_safetensors, iter_safetensors_weights,
                                           load_hf_config, num_safetensors_tensors)
from pagedserve.loader.sentence_transformers import pooler_config
from pagedserve.loader.source import ModelSource, resolve_model
from pagedserve.loader.tokenizer import load_tokenizer

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Checkpoint:
    source: ModelSource
    model_config: ModelConfig
    tokenizer: PreTrainedTokenizerBase
    generation_defaults: dict[str, Any]
    num_tensors: int
    # "awq" / "gptq" for an int4 Hugging Face checkpoint, "gguf" for a quantized GGUF, None for float weights
    quantization: str | None
    _iter_weights: Callable[..., Iterator[tuple[str, torch.Tensor | PackedWeight]]]
    # how it pools if served for embeddings (its sentence-transformers config, or the defaults)
    pooler_config: PoolerConfig | None = None

    def weights(self, packed: bool = False) -> Iterator[tuple[str, torch.Tensor | PackedWeight]]:
        """(Hugging Face name, tensor) pairs, with a progress bar while they load. With `packed`,
        quantized matrices come as PackedWeight where the format allows it."""
        yield from tqdm(self._iter_weights(packed=packed), total=self.num_tensors, desc="Loading weights",
                        unit="tensor", leave=False)


def open_checkpoint(config: EngineConfig) -> Checkpoint:
    source = resolve_model(config.model, config.revision, config.download_dir, config.use_modelscope)
    if source.kind == "gguf":
        if QUANTIZATION_ALIASES.get(config.quantization or "", config.quantization) in QUANTIZATION_METHODS:
            raise ValueError(f"--quantization {config.quantization} does not match {source.gguf_files[0]}: "
                             "a GGUF carries its own quantization")
        gguf = read_gguf(source.gguf_files)
        hf_config = gguf_hf_config(gguf)
        defaults: dict[str, Any] = {}
        num_tensors = num_gguf_tensors(gguf)
        iter_weights: Callable[..., Iterator[tuple[str, torch.Tensor | PackedWeight]]] = partial(
            iter_gguf_weights, gguf, hf_config)
        model_config = ModelConfig.from_hf(hf_config)
        quantization = "gguf" if model_config.checkpoint_dtype is None else None
    else:
        hf_config = load_hf_config(source.path)
        defaults = generation_defaults(source.path)
        int4 = int4_quantization(hf_config, config.quantization, source.path)
        if int4 is None:
            num_tensors, iter_weights = _hf_weights(source.path)
        else:
            num_tensors, iter_weights = num_safetensors_tensors(source.path), partial(iter_int4_weights,
                                                                                      source.path, int4)
        model_config = ModelConfig.from_hf(hf_config)
        quantization = None if int4 is None else int4.method
    tokenizer = load_tokenizer(source, config.tokenizer, config.chat_template)
    pooling = pooler_config(source.path if source.kind != "gguf" else None, hf_config, model_config.is_causal)
    return Checkpoint(source, model_config, tokenizer, defaults, num_tensors, quantization, iter_weights, pooling)


def _hf_weights(folder: Path) -> tuple[int, Callable[..., Iterator[tuple[str, torch.Tensor | PackedWeight]]]]:
    """(number of tensors, weight iterator) of a Hugging Face folder: safetensors when it has them, else
    PyTorch .bin files (unpickled weights-only)."""
    if has_safetensors(folder):
        return num_safetensors_tensors(folder), partial(_float_weights, folder)
    if bin_files(folder):
        return num_bin_tensors(folder), partial(_bin_weights, folder)
    raise ValueError(f"{folder}: no weights (*.safetensors or pytorch_model*.bin)")


def _float_weights(folder: Path, packed: bool = False) -> Iterator[tuple[str, torch.Tensor | PackedWeight]]:
    # float safetensors checkpoints hold float tensors only; there is nothing to keep packed.
    yield from iter_safetensors_weights(folder)


def _bin_weights(folder: Path, packed: bool = False) -> Iterator[tuple[str, torch.Tensor | PackedWeight]]:
    yield from iter_bin_weights(folder)
