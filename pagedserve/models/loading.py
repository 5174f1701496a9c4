"""Handing checkpoint tensors (Hugging Face names) to the parameters that load them."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from pagedserve.layers.quant import PackedWeight
from pagedserve.layers.weight_loader import weight_loader

# Checkpoint entries that carry no parameters of ours (precomputed buffers some exporters include).
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq", "rotary_emb.cos_cached", "rotary_emb.sin_cached")


def load_weights(model: nn.Module, weights: Iterable[tuple[str, torch.Tensor | PackedWeight]]) -> None:
    """Hand each checkpoint tensor (Hugging Face name) to the parameter that owns it.

    Fused parameters (qkv, gate/up) receive each piece with its shard id. A model may rename
    checkpoint prefixes (`checkpoint_prefixes`) and skip parts it does not run
    (`ignored_checkpoint_prefixes`, e.g. a vision tower; `ignored_checkpoint_suffixes`, e.g. saved buffers). Every parameter must be filled exactly
    once; anything missing or unknown is an error naming it.
    """
    params = dict(model.named_parameters())
    packed: dict[str, tuple[str, str]] = getattr(model, "packed_modules", {})
    renamed: dict[str, str] = getattr(model, "checkpoint_prefixes", {})
    # infix renames (".w1." -> ".gate_proj."), for families whose checkpoints name modules their own way
    infixes: dict[str, str] = getattr(model, "checkpoint_renames", {})
    ignored: tuple[str, ...] = getattr(model, "ignored_checkpoint_prefixes", ())
    ignored_suffixes: tuple[str, ...] = _IGNORED_SUFFIXES + getattr(model, "ignored_checkpoint_suffixes", ())
    tied = getattr(model.config, "tie_word_embeddings", False)
    # NOTE: under pipeline parallelism another stage's layers are no error here: that stage loads them.
    is_elsewhere = getattr(model, "is_elsewhere", lambda name: False)
    expected = set(_expected_shards(params, packed))
    loaded: set[tuple[str, str | None]] = set()
    for name, tensor in weights:
        if name.startswith(ignored):
            continue
        name = _renamed(name, renamed)
        for old, new in infixes.items():
            name = name.replace(old, new)
        if name.endswith(ignored_suffixes) or (tied and name == "lm_head.weight") or is_elsewhere(name):
            continue
        param_name, shard_id = _our_name(name, packed)
        param = params.get(param_name)
        if param is None:
            raise ValueError(f"checkpoint has a weight {name!r} that this model does not use")
        try:
            weight_loader(param)(param, tensor, shard_id)
        except ValueError as error:
            raise ValueError(f"weight {name!r}: {error}") from None
        loaded.add((param_name, shard_id))
    missing = sorted(f"{name}[{shard}]" if shard else name for name, shard in expected - loaded)
    if missing:
        raise ValueError(f"checkpoint is missing {len(missing)} weights, e.g. {', '.join(missing[:5])}")


def _renamed(name: str, prefixes: dict[str, str]) -> str:
    for old, new in prefixes.items():
        if name.startswith(old):
            return new + name.removeprefix(old)
    return name


def _our_name(name: str, packed: dict[str, tuple[str, str]]) -> tuple[str, str | None]:
    for checkpoint_part, (fused, shard_id) in packed.items():
        if f".{checkpoint_part}." in name:
            return name.replace(f".{checkpoint_part}.", f".{fused}."), shard_id
    return name, None


def _expected_shards(params: dict[str, nn.Parameter], packed: dict[str, tuple[str, str]]) -> Iterable[tuple[str, str | None]]:
    shards_of: dict[str, list[str]] = {}
    for fused, shard_id in packed.values():
        shards_of.setdefault(fused, []).append(shard_id)
    for name in params:
        module_name = name.split(".")[-2] if "." in name else ""
        if module_name in shards_of:
            yield from ((name, shard_id) for shard_id in shards_of[module_name])
        else:
            yield name, None
