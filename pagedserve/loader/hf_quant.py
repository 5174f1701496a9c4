"""AWQ and GPTQ int4 checkpoints (safetensors) and compressed-tensors W4A16/W8A16 (loader/compressed_tensors.py):
the quantization_config, and each quantized matrix repacked into our PackedWeight without rounding.

Layouts, as AutoAWQ / AutoGPTQ write them and vLLM reads them (w[out, in] = scale * (q - zero)):
- AWQ (GEMM): qweight int32 [in, out / 8], eight 4-bit codes of consecutive outputs per int32 in the
  order 0, 2, 4, 6, 1, 3, 5, 7 (so output k sits at nibble AWQ_NIBBLE_OF[k]); qzeros int32
  [in / group, out / 8] packed the same way; scales fp16 [in / group, out].
- GPTQ: qweight int32 [in / 8, out], eight codes of consecutive inputs per int32, input 8i + k at
  nibble k; qzeros int32 [in / group, out / 8] along outputs, nibble k = output 8j + k; scales fp16
  [in / group, out]; g_idx [in] the group of each input (out of order with desc_act: act-order, kept
  packed with the columns sorted by group, see PackedWeight.input_order). The "gptq" checkpoint format (v1, what
  AutoGPTQ, optimum and GPTQModel export by default) stores each zero minus one; "gptq_v2" stores it.
Groups of 32, 64, 128 (the usual) or a whole row are split into 32-weight groups: layers/quant.py.
"""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pagedserve.layers.quant import PackedWeight, pack_int4
from pagedserve.loader import compressed_tensors
from pagedserve.loader.safetensors import iter_safetensors_weights

QUANTIZATION_METHODS = ("awq", "gptq", "compressed-tensors")
# vLLM's names for its faster kernels of the same checkpoints; here they load the same packed weights.
QUANTIZATION_ALIASES = {"awq_marlin": "awq", "gptq_marlin": "gptq"}
_PARTS = ("qweight", "qzeros", "scales", "g_idx")
_AWQ_NIBBLE_OF = (0, 4, 1, 5, 2, 6, 3, 7)   # logical output k of a packed int32 -> its nibble


@dataclass(frozen=True)
class Int4Quantization:
    method: str                # awq | gptq | compressed-tensors
    group_size: int | None     # None: one group per row (GPTQ/AWQ group_size -1)
    zeros_minus_one: bool      # GPTQ v1 stores zero - 1
    # compressed-tensors: bits, symmetry and act-order (4 or 8 bits; AWQ and GPTQ are 4-bit)
    scheme: compressed_tensors.IntWeightScheme | None = None


def int4_quantization(hf_config: Any, requested: str | None, folder: Path) -> Int4Quantization | None:
    """The checkpoint's AWQ/GPTQ scheme, checked against --quantization; None for a float checkpoint."""
    config = getattr(hf_config, "quantization_config", None)
    if config is not None and not isinstance(config, dict):
        config = config.to_dict()
    method = None if config is None else str(config.get("quant_method", "")).lower()
    requested = QUANTIZATION_ALIASES.get(requested or "", requested)
    if requested is not None and requested in QUANTIZATION_METHODS and requested != method:
        found = f"its quantization_config says {method!r}" if method else "it has no quantization_config"
        raise ValueError(f"--quantization {requested} does not match the checkpoint {folder}: {found}")
    if config is None:
        return None
    if method not in QUANTIZATION_METHODS:
        raise ValueError(f"{folder}: quantization method {method!r} is not supported "
                         f"(supported: {', '.join(QUANTIZATION_METHODS)})")
    if method == "compressed-tensors":
        return Int4Quantization(method, None, False, compressed_tensors.scheme(config, folder))
    bits = config.get("bits", config.get("w_bit"))
    if bits != 4:
        raise ValueError(f"{folder}: {method} with {bits}-bit weights is not supported (4-bit only)")
    group_size = config.get("group_size", config.get("q_group_size", 128))
    if method == "awq":
        version = str(config.get("version", "gemm")).lower()
        if version != "gemm":
            raise ValueError(f"{folder}: AWQ version {version!r} is not supported (gemm)")
        if not config.get("zero_point", True):
            raise ValueError(f"{folder}: AWQ without zero points is not supported")
    checkpoint_format = str(config.get("checkpoint_format", "gptq")).lower()
    return Int4Quantization(method, None if group_size in (-1, None) else int(group_size),
                            zeros_minus_one=method == "gptq" and checkpoint_format != "gptq_v2")


def iter_int4_weights(folder: Path, quantization: Int4Quantization, packed: bool
                      ) -> Iterator[tuple[str, torch.Tensor | PackedWeight]]:
    """Every tensor of the checkpoint; each quantized module's parts become one `<module>.weight`, a
    PackedWeight (or, without `packed`, its float32 dequantization)."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    scheme = quantization.scheme
    part_names = _PARTS if scheme is None else compressed_tensors.PARTS
    num_parts = (3 if quantization.method == "awq" else 4 if scheme is None
                 else len(compressed_tensors.expected_parts(scheme)))
    for name, tensor in iter_safetensors_weights(folder):
        module, _, part = name.rpartition(".")
        if part not in part_names:
            yield name, tensor
            continue
        parts = pending.setdefault(module, {})
        parts[part] = tensor
        if len(parts) == num_parts:
            yield _module_weight(module, pending.pop(module), quantization, packed)
    # NOTE: a GPTQ module without g_idx (some exporters leave it out) is complete only once the files end.
    for module, parts in pending.items():
        if quantization.method == "awq" or set(parts) != {"qweight", "qzeros", "scales"}:
            raise ValueError(f"{folder}: quantized module {module!r} has only {', '.join(sorted(parts))}")
        yield _module_weight(module, parts, quantization, packed)


def _module_weight(module: str, parts: dict[str, torch.Tensor], quantization: Int4Quantization, packed: bool
                   ) -> tuple[str, torch.Tensor | PackedWeight]:
    weight = _repack(module, parts, quantization)
    return f"{module}.weight", weight if packed else weight.dequantize()


def _repack(module: str, parts: dict[str, torch.Tensor], quantization: Int4Quantization) -> PackedWeight:
    if quantization.scheme is not None:
        return compressed_tensors.repack(module, parts, quantization.scheme)
    if quantization.method == "awq":
        codes = _unpack_rows(parts["qweight"], _AWQ_NIBBLE_OF).t()          # [out, in]
        zeros = _unpack_rows(parts["qzeros"], _AWQ_NIBBLE_OF).t()           # [out, groups]
    else:
        codes = _unpack_gptq_qweight(parts["qweight"]).t()
        zeros = _unpack_rows(parts["qzeros"], tuple(range(8))).t()
        if quantization.zeros_minus_one:
            zeros = zeros + 1
    scales = parts["scales"].float().t()                                    # [out, groups]
    out_features, in_features = codes.shape
    if zeros.shape != scales.shape or scales.shape[0] != out_features:
        raise ValueError(f"{module}: qzeros {tuple(parts['qzeros'].shape)} and scales {tuple(parts['scales'].shape)} "
                         f"do not fit qweight {tuple(parts['qweight'].shape)}")
    group_size = quantization.group_size or in_features
    if scales.shape[1] * group_size != in_features:
        raise ValueError(f"{module}: {scales.shape[1]} groups of {group_size} do not cover {in_features} inputs")
    input_order = None
    if "g_idx" in parts and not torch.equal(parts["g_idx"].long(), torch.arange(in_features) // group_size):
        # act-order (desc_act): sort the inputs by group so each group's columns are contiguous again
        group_of_input = parts["g_idx"].long()
        if group_of_input.shape != (in_features,) or not torch.equal(
                torch.bincount(group_of_input, minlength=scales.shape[1]), torch.full((scales.shape[1],), group_size)):
            raise ValueError(f"{module}: g_idx does not put {group_size} inputs in each of {scales.shape[1]} groups")
        input_order = torch.argsort(group_of_input, stable=True)
        codes = codes.index_select(1, input_order)
    try:
        return pack_int4(codes, scales, zeros.float(), group_size, input_order)
    except ValueError as error:
        raise ValueError(f"{module}: {error}") from None


def _unpack_rows(packed: torch.Tensor, nibble_of: tuple[int, ...]) -> torch.Tensor:
    """int32 [rows, cols / 8] -> uint8 [rows, cols]: logical column 8j + k is nibble nibble_of[k] of int j."""
    shifts = torch.tensor([4 * nibble for nibble in nibble_of], dtype=torch.int32)
    values = (packed.to(torch.int32)[:, :, None] >> shifts) & 0xF              # [rows, cols / 8, 8]
    return values.reshape(packed.shape[0], -1).to(torch.uint8)


def _unpack_gptq_qweight(qweight: torch.Tensor) -> torch.Tensor:
    """int32 [in / 8, out] -> uint8 [in, out]: input 8i + k is nibble k of row i."""
    shifts = torch.arange(0, 32, 4, dtype=torch.int32)
    values = (qweight.to(torch.int32)[:, None, :] >> shifts[None, :, None]) & 0xF   # [in / 8, 8, out]
    return values.reshape(-1, qweight.shape[1]).to(torch.uint8)
