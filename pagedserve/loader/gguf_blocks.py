"""GGUF quantized blocks -> PackedWeight (int8 codes, per-group scale and offset), without rounding.

Each format's layout mirrors the gguf package's own dequantizers (gguf/quants.py); the tests check
that `PackedWeight.dequantize()` reproduces `gguf.quants.dequantize` exactly for every format here.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import Q4_K

from pagedserve.layers.quant import PackedWeight

# (codes, scales [num_blocks, groups], offsets or None, group size, bits): codes are int8
# [num_blocks, block_elems] for 8 bits, or [num_blocks, block_elems // 2] bytes of nibbles for 4 bits.
_Unpacked = tuple[np.ndarray, np.ndarray, np.ndarray | None, int, int]


def _half(raw: np.ndarray) -> np.ndarray:
    return raw.view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, 16] bytes -> [n, 32] values: low nibbles are elements 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=-1)


def _pack_nibbles(values: np.ndarray) -> np.ndarray:
    """[n, 32 * k] values 0..15 -> [n, 16 * k] bytes in the Q4 layout (weight j low, j + 16 high)."""
    groups = values.reshape(values.shape[0], -1, 2, 16).astype(np.uint8)
    return (groups[:, :, 0, :] | (groups[:, :, 1, :] << 4)).reshape(values.shape[0], -1)


def _q8_0(blocks: np.ndarray) -> _Unpacked:
    return blocks[:, 2:].view(np.int8), _half(blocks[:, :2]), None, 32, 8


def _q4_0(blocks: np.ndarray) -> _Unpacked:
    # d * (q - 8) == d * q + (-8 d) exactly: the nibbles stay as stored, the -8 moves into the offset.
    scales = _half(blocks[:, :2])
    return blocks[:, 2:], scales, -8.0 * scales, 32, 4


def _q4_1(blocks: np.ndarray) -> _Unpacked:
    return blocks[:, 4:], _half(blocks[:, :2]), _half(blocks[:, 2:4]), 32, 4


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """[n, 4] bytes holding 32 bits -> [n, 32] values of bit i, shifted to 16."""
    bits = qh.copy().view(np.uint32) >> np.arange(32, dtype=np.uint32)[None, :]
    return ((bits & 1) << 4).astype(np.uint8)


def _q5_0(blocks: np.ndarray) -> _Unpacked:
    codes = (_nibbles(blocks[:, 6:]) | _high_bits(blocks[:, 2:6])).astype(np.int8) - 16
    return codes, _half(blocks[:, :2]), None, 32, 8


def _q5_1(blocks: np.ndarray) -> _Unpacked:
    codes = (_nibbles(blocks[:, 8:]) | _high_bits(blocks[:, 4:8])).astype(np.int8)
    return codes, _half(blocks[:, :2]), _half(blocks[:, 2:4]), 32, 8


def _k_scales(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K super-block: per 32-weight group scale d*sc and offset -dmin*m."""
    d, dmin = _half(blocks[:, :2]), _half(blocks[:, 2:4])
    sc, mins = Q4_K.get_scale_min(blocks[:, 4:16])
    return d * sc.astype(np.float32), -(dmin * mins.astype(np.float32))


def _k_low_nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, 128] -> [n, 256]: each 32-byte chunk gives two groups, low nibbles first."""
    chunks = qs.reshape(-1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return (chunks & 0x0F).reshape(-1, 256)


def _q4_k(blocks: np.ndarray) -> _Unpacked:
    scales, offsets = _k_scales(blocks)
    return _pack_nibbles(_k_low_nibbles(blocks[:, 16:144])), scales, offsets, 32, 4


def _q5_k(blocks: np.ndarray) -> _Unpacked:
    scales, offsets = _k_scales(blocks)
    qh = blocks[:, 16:48].reshape(-1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    codes = _k_low_nibbles(blocks[:, 48:176]) | ((qh & 1) << 4).reshape(-1, 256)
    return codes.astype(np.int8), scales, offsets, 32, 8


def _q6_k(blocks: np.ndarray) -> _Unpacked:
    ql = blocks[:, :128].reshape(-1, 2, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    qh = blocks[:, 128:192].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    codes = ((ql & 0x0F).reshape(-1, 256) | ((qh & 0x03).reshape(-1, 256) << 4)).astype(np.int8) - 32
    scales = _half(blocks[:, 208:210]) * blocks[:, 192:208].view(np.int8).astype(np.float32)
    return codes, scales, None, 16, 8


def _q2_k(blocks: np.ndarray) -> _Unpacked:
    # 16 groups of 16: scale d * (sc & 15), offset -dmin * (sc >> 4); 2-bit codes, four per byte
    sc = blocks[:, :16]
    d, dmin = _half(blocks[:, 80:82]), _half(blocks[:, 82:84])
    qs = blocks[:, 16:80].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    codes = (qs & 3).reshape(-1, 256).astype(np.int8)
    return codes, d * (sc & 0x0F).astype(np.float32), -(dmin * (sc >> 4).astype(np.float32)), 16, 8


def _q3_k(blocks: np.ndarray) -> _Unpacked:
    # 16 groups of 16 with 6-bit signed scales; codes 2 low bits minus 4 where the high-bit mask is 0
    d = _half(blocks[:, 108:110])
    low = (blocks[:, 96:104].reshape(-1, 1, 8) >> np.array([0, 4], dtype=np.uint8).reshape(1, 2, 1)).reshape(-1, 16)
    high = (blocks[:, 104:108].reshape(-1, 1, 4) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 4, 1)
            ).reshape(-1, 16)
    sc = ((low & 0x0F) | ((high & 0x03) << 4)).astype(np.int8) - 32
    ql = blocks[:, 32:96].reshape(-1, 2, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    qh = blocks[:, :32].reshape(-1, 1, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 1, 8, 1)
    codes = (ql & 3).reshape(-1, 256).astype(np.int8) - (((qh & 1) ^ 1) << 2).reshape(-1, 256).astype(np.int8)
    return codes, d * sc.astype(np.float32), None, 16, 8


_UNPACKERS: dict[GGMLQuantizationType, Callable[[np.ndarray], _Unpacked]] = {
    GGMLQuantizationType.Q8_0: _q8_0,
    GGMLQuantizationType.Q4_0: _q4_0,
    GGMLQuantizationType.Q4_1: _q4_1,
    GGMLQuantizationType.Q5_0: _q5_0,
    GGMLQuantizationType.Q5_1: _q5_1,
    GGMLQuantizationType.Q2_K: _q2_k,
    GGMLQuantizationType.Q3_K: _q3_k,
    GGMLQuantizationType.Q4_K: _q4_k,
    GGMLQuantizationType.Q5_K: _q5_k,
    GGMLQuantizationType.Q6_K: _q6_k,
}


def can_pack(ggml_type: GGMLQuantizationType) -> bool:
    return ggml_type in _UNPACKERS


def pack_blocks(rows: np.ndarray, ggml_type: GGMLQuantizationType, row_length: int) -> PackedWeight:
    """rows: [num_rows, bytes_per_row] raw GGUF data of a matrix with `row_length` columns."""
    _, block_bytes = GGML_QUANT_SIZES[ggml_type]
    num_rows = rows.shape[0]
    blocks = np.ascontiguousarray(rows).reshape(-1, block_bytes)
    codes, scales, offsets, group_size, bits = _UNPACKERS[ggml_type](blocks)
    groups_per_row = row_length // group_size
    return PackedWeight(
        codes=torch.from_numpy(np.ascontiguousarray(codes).reshape(num_rows, row_length * bits // 8)),
        scales=torch.from_numpy(np.ascontiguousarray(scales, dtype=np.float32).reshape(num_rows, groups_per_row)),
        offsets=None if offsets is None else torch.from_numpy(
            np.ascontiguousarray(offsets, dtype=np.float32).reshape(num_rows, groups_per_row)),
        group_size=group_size,
        bits=bits,
    )
