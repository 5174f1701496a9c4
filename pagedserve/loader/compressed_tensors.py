"""compressed-tensors weight-only integer checkpoints (llm-compressor's W4A16 / W8A16, "pack-quantized"):
the config's scheme, and each module's parts repacked into a PackedWeight without rounding.

Layout (compressed_tensors' pack_to_int32): weight_packed int32 [out, in * bits / 32], each int32 holding
32 / bits consecutive inputs, input 8j + k (4-bit) at bits 4k, stored unsigned (the signed code plus
2^(bits-1)); weight_scale [out, groups] (one group per row for the "channel" strategy); asymmetric
schemes add weight_zero_point int32 [out * bits / 32, groups], packed the same way along the outputs;
weight_g_idx [in] with act-order; weight_shape [2] = (out, in). w = scale * (code - zero_point).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pagedserve.layers.quant import PackedWeight, pack_int4

PARTS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_g_idx", "weight_shape")


@dataclass(frozen=True)
class IntWeightScheme:
    num_bits: int               # 4 or 8
    is_symmetric: bool
    has_g_idx: bool             # act-order: an input order per module


def scheme(config: dict[str, Any], folder: Path) -> IntWeightScheme:
    """The one weight-only int scheme of every config group; anything else is refused by name."""
    if config.get("format") != "pack-quantized":
        raise ValueError(f"{folder}: compressed-tensors format {config.get('format')!r} is not supported "
                         "(pack-quantized: W4A16, W8A16)")
    schemes = set()
    for name, group in (config.get("config_groups") or {}).items():
        weights = group.get("weights") or {}
        if group.get("input_activations") or weights.get("type", "int") != "int" or weights.get("num_bits") not in (4, 8):
            raise ValueError(f"{folder}: compressed-tensors group {name!r} is not weight-only int4/int8 "
                             f"(weights {weights}, activations {group.get('input_activations')}); only W4A16 and "
                             "W8A16 are supported")
        if weights.get("strategy", "group") not in ("group", "channel"):
            raise ValueError(f"{folder}: compressed-tensors strategy {weights.get('strategy')!r} is not supported "
                             "(group, channel)")
        schemes.add(IntWeightScheme(int(weights["num_bits"]), bool(weights.get("symmetric", True)),
                                    weights.get("actorder") not in (None, False, "weight")))
    if len(schemes) != 1:
        raise ValueError(f"{folder}: compressed-tensors needs exactly one weight scheme, found {len(schemes)}")
    return schemes.pop()


def expected_parts(weight_scheme: IntWeightScheme) -> frozenset[str]:
    return frozenset({"weight_packed", "weight_scale", "weight_shape"}
                     | (set() if weight_scheme.is_symmetric else {"weight_zero_point"})
                     | ({"weight_g_idx"} if weight_scheme.has_g_idx else set()))


def repack(module: str, parts: dict[str, torch.Tensor], weight_scheme: IntWeightScheme) -> PackedWeight:
    bits = weight_scheme.num_bits
    out_features, in_features = (int(size) for size in parts["weight_shape"].tolist())
    codes = unpack_int32(parts["weight_packed"], bits)[:, :in_features]           # [out, in] unsigned
    scales = parts["weight_scale"].float()                                      # [out, groups]
    if codes.shape[0] != out_features or scales.shape[0] != out_features or in_features % scales.shape[1]:
        raise ValueError(f"{module}: weight_packed {tuple(parts['weight_packed'].shape)} and weight_scale "
                         f"{tuple(scales.shape)} do not fit weight_shape ({out_features}, {in_features})")
    group_size = in_features // scales.shape[1]
    if weight_scheme.is_symmetric:
        zeros = torch.full_like(scales, float(1 << (bits - 1)))
    else:
        zeros = unpack_int32(parts["weight_zero_point"].t().contiguous(), bits).t()[:out_features].float()
    input_order = None
    if "weight_g_idx" in parts:
        group_of_input = parts["weight_g_idx"].long()
        if not torch.equal(group_of_input, torch.arange(in_features) // group_size):
            input_order = torch.argsort(group_of_input, stable=True)
            codes = codes.index_select(1, input_order)
    try:
        if bits == 4:
            return pack_int4(codes, scales, zeros, group_size, input_order)
        # 8-bit: signed codes, offset -scale * (zero - 128), in the kernel's 32-weight groups
        offsets = None if weight_scheme.is_symmetric else -scales * (zeros - 128)
        weight = PackedWeight((codes.to(torch.int16) - 128).to(torch.int8), scales, offsets, group_size,
                              input_order=input_order)
        return weight.regroup(32)
    except ValueError as error:
        raise ValueError(f"{module}: {error}") from None


def unpack_int32(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 [rows, n] -> uint8 [rows, n * 32 / bits]: column (32 / bits) * j + k is bits [bits * k, bits * (k + 1))."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)
    values = (packed.to(torch.int32)[:, :, None] >> shifts) & ((1 << bits) - 1)   # [rows, n, 32 / bits]
    return values.reshape(packed.shape[0], -1).to(torch.uint8)
