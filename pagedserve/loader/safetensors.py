"""Hugging Face checkpoints: config.json, (sharded) *.safetensors weights, generation_config.json defaults."""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

_INDEX_FILE = "model.safetensors.index.json"
# generation_config.json keys that become a request's defaults when the request leaves them unset
_GENERATION_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens",
                    "eos_token_id")


def load_hf_config(folder: Path) -> Any:
    """The transformers `PretrainedConfig` of a Hugging Face model folder."""
    from transformers import AutoConfig

    config_file = Path(folder) / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{config_file}: missing; a Hugging Face model folder needs its config.json")
    _read_json(config_file)  # a precise error for bad JSON, before transformers words it its own way
    try:
        return AutoConfig.from_pretrained(folder)
    except (ValueError, KeyError, OSError) as error:
        # e.g. a model_type this transformers does not know, or fields that fail the config's validation
        raise ValueError(f"{config_file}: transformers cannot load this config: {error}") from error


def has_safetensors(folder: Path) -> bool:
    folder = Path(folder)
    return (folder / _INDEX_FILE).is_file() or any(folder.glob("*.safetensors"))


def safetensors_files(folder: Path) -> list[Path]:
    """The weight files, from the shard index when there is one, else every *.safetensors in the folder."""
    folder = Path(folder)
    index_file = folder / _INDEX_FILE
    if index_file.is_file():
        return indexed_shards(index_file)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder}: no *.safetensors weights ")
    return files


def iter_safetensors_weights(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) for every tensor of every weight file, in the dtype the file stores."""
    from safetensors import safe_open

    for file in safetensors_files(folder):
        try:
            handle = safe_open(file, framework="pt")
        except Exception as error:  # noqa: BLE001 - safetensors raises its own SafetensorError and OSErrors
            raise ValueError(f"{file}: not a valid safetensors file ({error})") from error
        with handle:
            for name in handle.keys():
                yield name, handle.get_tensor(name)


def num_safetensors_tensors(folder: Path) -> int:
    """How many tensors iter_safetensors_weights yields (for a progress bar)."""
    from safetensors import safe_open

    total = 0
    for file in safetensors_files(folder):
        try:
            with safe_open(file, framework="pt") as handle:
                total += len(handle.keys())
        except Exception as error:  # noqa: BLE001 - as in iter_safetensors_weights
            raise ValueError(f"{file}: not a valid safetensors file ({error})") from error
    return total


def generation_defaults(folder: Path | None) -> dict[str, Any]:
    """Sampling defaults from the folder's generation_config.json: only the keys it sets; {} without one."""
    if folder is None or not (Path(folder) / "generation_config.json").is_file():
        return {}
    config = _read_json(Path(folder) / "generation_config.json")
    return {key: config[key] for key in _GENERATION_KEYS if config.get(key) is not None}


def indexed_shards(index_file: Path) -> list[Path]:
    """The weight files a Hugging Face shard index (`*.index.json`: its weight_map) names, each checked to exist."""
    weight_map = _read_json(index_file).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index_file}: has no weight_map")
    files = [index_file.parent / name for name in sorted(set(weight_map.values()))]
    for file in files:
        if not file.is_file():
            raise ValueError(f"{file}: missing, though {index_file.name} lists it")
    return files


def _read_json(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(content).__name__}")
    return content
