"""What a checkpoint is, read from its headers without loading weights: format, family, size,
quantization, context length, chat template. For `/api/tags`, `/api/show`, `pagedserve list/show`.
"""
from __future__ import annotations

import json
import math
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pagedserve.loader.source import ModelSource

# Ollama's model_info drops metadata arrays longer than this (the vocabulary, merges, ...).
_MAX_INFO_ARRAY = 5


@dataclass(frozen=True)
class ModelDetails:
    format: str                  # "gguf", "safetensors" or "pytorch" (.bin)
    family: str                  # llama, qwen2, gemma3, ...
    parameter_count: int
    quantization: str            # Q4_K_M, Q8_0, BF16, F32, ...
    context_length: int
    embedding_length: int
    size_bytes: int              # of the weight files on disk
    modified: float              # newest mtime of those files (Unix time)
    chat_template: str | None = None
    info: dict[str, Any] = field(default_factory=dict, repr=False)   # Ollama's model_info

    @property
    def parameter_size(self) -> str:
        return human_number(self.parameter_count)

    def ollama_details(self, parent_model: str = "") -> dict[str, Any]:
        """Ollama's `details` object."""
        return {"parent_model": parent_model, "format": self.format, "family": self.family,
                "families": [self.family], "parameter_size": self.parameter_size,
                "quantization_level": self.quantization}


def describe(source: ModelSource) -> ModelDetails:
    """Raises ValueError for files that cannot be read."""
    if source.kind == "gguf":
        return _describe_gguf(source.gguf_files)
    return _describe_hf(source.path)


def human_number(count: int) -> str:
    """135M, 1.5B, 7B: Ollama's parameter_size."""
    for limit, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if count >= limit:
            value = count / limit
            return f"{value:.0f}{suffix}" if value >= 100 or value == int(value) else f"{value:.1f}{suffix}"
    return str(count)


def human_bytes(num_bytes: int) -> str:
    """'270 MB', '1.3 GB': sizes as `ollama list` prints them (decimal units)."""
    for limit, unit in ((1e12, "TB"), (1e9, "GB"), (1e6, "MB"), (1e3, "KB")):
        if num_bytes >= limit:
            value = num_bytes / limit
            return f"{value:.0f} {unit}" if value >= 10 else f"{value:.1f} {unit}"
    return f"{num_bytes} B"


def _describe_gguf(files: tuple[Path, ...]) -> ModelDetails:
    from pagedserve.loader.gguf import read_gguf

    checkpoint = read_gguf(files)
    metadata = checkpoint.metadata
    arch = checkpoint.architecture
    num_params = sum(math.prod(info.shape) for info in checkpoint.tensors)
    info = {key: value for key, value in metadata.items()
            if not key.startswith("GGUF.") and key not in ("general.name", "tokenizer.chat_template")}
    info = {key: ([] if isinstance(value, list) and len(value) > _MAX_INFO_ARRAY else value)
            for key, value in info.items()}
    info["general.parameter_count"] = num_params
    return ModelDetails(
        format="gguf", family=arch, parameter_count=num_params, quantization=_gguf_file_type(metadata),
        context_length=int(metadata.get(f"{arch}.context_length", 0)),
        embedding_length=int(metadata.get(f"{arch}.embedding_length", 0)),
        size_bytes=sum(path.stat().st_size for path in files), modified=max(path.stat().st_mtime for path in files),
        chat_template=metadata.get("tokenizer.chat_template"), info=info)


def _gguf_file_type(metadata: dict[str, Any]) -> str:
    import gguf

    file_type = metadata.get("general.file_type")
    if file_type is None:
        return "unknown"
    try:
        name = gguf.LlamaFileType(int(file_type)).name
    except (TypeError, ValueError):
        return "unknown"
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


_QUANT_BOOKKEEPING = (".qzeros", ".scales", ".g_idx", ".weight_scale", ".weight_zero_point", ".weight_g_idx",
                      ".weight_shape")


def _describe_hf(folder: Path) -> ModelDetails:
    from pagedserve.loader.safetensors import has_safetensors, safetensors_files

    config = _read_json(folder / "config.json")
    text_config = config.get("text_config") or config
    quantization_config = config.get("quantization_config") or {}
    quant_method = str(quantization_config.get("quant_method") or "")
    groups = list((quantization_config.get("config_groups") or {}).values())
    weights_per_int32 = 32 // int(((groups[0].get("weights") or {}) if groups else {}).get("num_bits") or 4)
    num_params, dtypes = 0, Counter[str]()
    if has_safetensors(folder):
        files, weight_format = safetensors_files(folder), "safetensors"
        for file in files:
            for name, tensor in _safetensors_header(file).items():
                count = math.prod(tensor["shape"])
                if name.endswith(_QUANT_BOOKKEEPING):                 # AWQ/GPTQ/compressed-tensors: not weights
                    continue
                if name.endswith((".qweight", ".weight_packed")):      # 4-bit (or 8-bit) weights packed in int32s
                    count *= 8 if name.endswith(".qweight") else weights_per_int32
                num_params += count
                dtypes[tensor["dtype"]] += count
    else:
        files, weight_format = _bin_tensor_counts(folder, dtypes), "pytorch"
        num_params = sum(dtypes.values())
    if not files:
        raise ValueError(f"{folder}: no weights (*.safetensors or pytorch_model*.bin)")
    family = str(text_config.get("model_type") or config.get("model_type") or "unknown")
    info = {"general.architecture": family, "general.parameter_count": num_params,
            f"{family}.context_length": text_config.get("max_position_embeddings"),
            f"{family}.embedding_length": text_config.get("hidden_size"),
            f"{family}.block_count": text_config.get("num_hidden_layers"),
            f"{family}.attention.head_count": text_config.get("num_attention_heads"),
            f"{family}.attention.head_count_kv": text_config.get("num_key_value_heads")}
    return ModelDetails(
        format=weight_format, family=family, parameter_count=num_params,
        quantization=quant_method.upper() or (dtypes.most_common(1)[0][0] if dtypes else "unknown"),
        context_length=int(text_config.get("max_position_embeddings") or 0),
        embedding_length=int(text_config.get("hidden_size") or 0),
        size_bytes=sum(path.stat().st_size for path in files), modified=max(path.stat().st_mtime for path in files),
        chat_template=_hf_chat_template(folder), info={key: value for key, value in info.items() if value is not None})


def _bin_tensor_counts(folder: Path, dtypes: Counter[str]) -> list[Path]:
    """The .bin files, with each dtype's element count added to `dtypes` (memory-mapped: no tensor is read)."""
    from pagedserve.loader.pytorch_bin import bin_files, load_state_dict

    files = bin_files(folder)
    for file in files:
        for tensor in load_state_dict(file).values():
            dtypes[str(tensor.dtype).removeprefix("torch.").upper()] += tensor.numel()
    return files


def _safetensors_header(file: Path) -> dict[str, Any]:
    """The tensor table of a safetensors file: its first 8 bytes give the JSON header's length."""
    try:
        with file.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
    except (OSError, struct.error, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{file}: not a valid safetensors file ({error})") from error
    header.pop("__metadata__", None)
    return header


def _hf_chat_template(folder: Path) -> str | None:
    jinja = folder / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    tokenizer_config = folder / "tokenizer_config.json"
    template = _read_json(tokenizer_config).get("chat_template") if tokenizer_config.is_file() else None
    return template if isinstance(template, str) else None


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: cannot read ({error})") from error
