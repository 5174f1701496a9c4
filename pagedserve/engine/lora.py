"""LoRA adapters: PEFT folders loaded beside the base model and served per request, with no merging.

An adapter is a PEFT folder (adapter_config.json + adapter_model.safetensors). Each loaded adapter takes
one of `max_loras` slots; its A/B pairs are handed to the `Linear` layers they target (layers/lora.py
applies them per token row). A request names its adapter; its sequences carry the slot (for the runner)
and a key unique to this load of the adapter (for the prefix cache: blocks are never shared across
adapters, nor with an earlier adapter that held the same name or slot).
"""
from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from pagedserve.layers.linear import Linear
from pagedserve.layers.lora import LoRAPair

_PEFT_PREFIX = "base_model.model."


class LoRAError(ValueError):
    """A bad, unknown or unloadable adapter: the client's fault (a 4xx), the engine keeps serving."""


class LoRANotFoundError(LoRAError):
    pass


@dataclass(frozen=True)
class LoRARequest:
    """As vLLM's: `LoRARequest(lora_name, lora_int_id, lora_path)`."""

    lora_name: str
    lora_int_id: int
    lora_path: str
    base_model_name: str | None = None


@dataclass(frozen=True)
class LoadedAdapter:
    name: str
    path: str
    slot: int               # 1..max_loras; 0 is the base model
    cache_key: int          # unique per load, enters the prefix cache's block hashes
    rank: int


_cache_keys = itertools.count(1)


class LoRAManager:
    """The adapters loaded into one model. Touched only by the engine's thread."""

    def __init__(self, model: nn.Module, max_loras: int, max_lora_rank: int, dtype: torch.dtype,
                 device: torch.device) -> None:
        self.model = model
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.dtype = dtype
        self.device = device
        self.adapters: dict[str, LoadedAdapter] = {}
        self._packed: dict[str, tuple[str, str]] = getattr(model, "packed_modules", {})

    def get(self, name: str) -> LoadedAdapter:
        adapter = self.adapters.get(name)
        if adapter is None:
            raise LoRANotFoundError(f"The model `{name}` does not exist.")
        return adapter

    def add(self, name: str, path: str) -> LoadedAdapter:
        """Load a PEFT folder under `name`; raises LoRAError for anything wrong with it."""
        if name in self.adapters:
            raise LoRAError(f"The lora adapter '{name}' has already been loaded.")
        rank, pairs = self._read(Path(path))   # first, so a bad folder is named as such
        used = {adapter.slot for adapter in self.adapters.values()}
        free = [slot for slot in range(1, self.max_loras + 1) if slot not in used]
        if not free:
            raise LoRAError(f"cannot load adapter '{name}': {self.max_loras} adapters are loaded already "
                            f"(--max-loras {self.max_loras}); unload one first")
        slot = free[0]
        for module, pair in pairs:
            module.lora_pairs.setdefault(slot, []).append(pair)
        adapter = LoadedAdapter(name, path, slot, next(_cache_keys), rank)
        self.adapters[name] = adapter
        return adapter

    def remove(self, name: str) -> None:
        adapter = self.get(name)
        for module in self.model.modules():
            if isinstance(module, Linear):
                module.lora_pairs.pop(adapter.slot, None)
        del self.adapters[name]

    def _read(self, folder: Path) -> tuple[int, list[tuple[Linear, LoRAPair]]]:
        config_path, weights_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
        if not config_path.is_file() or not weights_path.is_file():
            raise LoRAError(f"no LoRA adapter at '{folder}': it needs adapter_config.json and "
                            f"adapter_model.safetensors")
        try:
            config = json.loads(config_path.read_text())
            tensors = load_file(str(weights_path))
        except (ValueError, OSError) as error:
            raise LoRAError(f"cannot read the LoRA adapter at '{folder}': {error}") from None
        if config.get("peft_type", "LORA") != "LORA":
            raise LoRAError(f"'{folder}' is a {config.get('peft_type')} adapter; only LORA is supported")
        for option in ("use_dora", "fan_in_fan_out"):
            if config.get(option):
                raise LoRAError(f"LoRA adapters with {option} are not supported")
        if config.get("rank_pattern") or config.get("alpha_pattern"):
            raise LoRAError("LoRA adapters with per-module rank_pattern/alpha_pattern are not supported")
        if config.get("bias", "none") != "none" or config.get("modules_to_save"):
            raise LoRAError("LoRA adapters that train biases or whole modules (modules_to_save) are not supported")
        rank = int(config.get("r", 0))
        if rank < 1:
            raise LoRAError(f"adapter_config.json has no valid rank r: {config.get('r')!r}")
        if rank > self.max_lora_rank:
            raise LoRAError(f"LoRA rank {rank} is greater than max_lora_rank {self.max_lora_rank} "
                            f"(--max-lora-rank)")
        alpha = float(config.get("lora_alpha", rank))
        scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
        pairs = []
        for key, a in tensors.items():
            if ".lora_B." in key:
                continue
            if not key.endswith(".lora_A.weight"):
                raise LoRAError(f"adapter weight '{key}' is not a LoRA A/B matrix of a linear layer")
            module_path = key.removesuffix(".lora_A.weight").removeprefix(_PEFT_PREFIX)
            b = tensors.get(key.replace(".lora_A.", ".lora_B."))
            if b is None:
                raise LoRAError(f"adapter weight '{key}' has no lora_B beside it")
            module, rows = self._target(module_path)
            if a.shape != (rank, module.in_features) or b.shape != (rows.stop - rows.start, rank):
                raise LoRAError(f"adapter weights of '{module_path}' have shapes {tuple(a.shape)} and "
                                f"{tuple(b.shape)}, which do not fit this model")
            pairs.append((module, LoRAPair(rows, a.to(self.device, self.dtype),
                                           (b.double() * scaling).to(self.device, self.dtype))))
        if not pairs:
            raise LoRAError(f"the adapter at '{folder}' holds no LoRA weights")
        return rank, pairs

    def _target(self, module_path: str) -> tuple[Linear, slice]:
        parent, _, leaf = module_path.rpartition(".")
        shard: str | None = None
        if leaf in self._packed:
            leaf, shard = self._packed[leaf]
        try:
            module = self.model.get_submodule(f"{parent}.{leaf}" if parent else leaf)
        except AttributeError:
            module = None
        if not isinstance(module, Linear):
            raise LoRAError(f"the adapter targets '{module_path}', which is not a linear layer of this model")
        if shard is None:
            return module, slice(0, module.out_features)
        offset, size = module.shard_offsets[shard]
        return module, slice(offset, offset + size)
