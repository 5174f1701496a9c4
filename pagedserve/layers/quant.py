"""Group-quantized weights kept packed: integer codes plus a float scale (and offset) per group.

w[n, k] = scales[n, k // group_size] * code[n, k] + offsets[n, k // group_size]

Codes are int8, one per byte (`bits=8`, groups of 16 or 32), or 4-bit values 0..15 two per byte
(`bits=4`, groups of 32 in GGUF's Q4 layout: byte j of a group holds weight j in its low nibble and
weight j + 16 in its high nibble). Every GGUF block format the loader repacks (Q4_0/1, Q5_0/1, Q8_0,
Q2_K, Q3_K, Q4_K, Q5_K, Q6_K) is exactly this, so packed weights compute the same function as dequantized ones
while moving 3-6x fewer bytes per token through memory.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class PackedWeight:
    codes: torch.Tensor              # int8 [out, in] (bits=8) or uint8 [out, in // 2] (bits=4)
    scales: torch.Tensor             # [out_features, in_features // group_size] float32
    offsets: torch.Tensor | None     # same shape as scales; None for symmetric formats
    group_size: int
    bits: int = 8
    # NOTE: act-order GPTQ groups the inputs out of order. The codes then hold the columns sorted by
    # group (column j is input input_order[j]) and the layer multiplies x[..., input_order] by them;
    # dequantize() gives the weights in the inputs' own order.
    input_order: torch.Tensor | None = None

    @property
    def shape(self) -> torch.Size:
        rows, width = self.codes.shape
        return torch.Size((rows, width * 8 // self.bits))

    def int_codes(self) -> torch.Tensor:
        """The codes one per element: int8 [out_features, in_features]."""
        if self.bits == 8:
            return self.codes
        rows, width = self.codes.shape
        grouped = self.codes.view(rows, width // 16, 16)                 # [rows, groups, 16 bytes]
        low, high = grouped & 0x0F, grouped >> 4
        return torch.cat((low, high), dim=-1).view(rows, width * 2).to(torch.int8)

    def dequantize(self) -> torch.Tensor:
        """float32 [out_features, in_features]."""
        rows, cols = self.shape
        grouped = self.int_codes().view(rows, cols // self.group_size, self.group_size).float()
        values = grouped * self.scales[..., None]
        if self.offsets is not None:
            values = values + self.offsets[..., None]
        if self.input_order is not None:
            return values.view(rows, cols).index_select(1, torch.argsort(self.input_order))
        return values.view(rows, cols)

    def to_int8(self) -> PackedWeight:
        return self if self.bits == 8 else PackedWeight(self.int_codes(), self.scales, self.offsets, self.group_size,
                                                        input_order=self.input_order)

    def regroup(self, group_size: int) -> PackedWeight:
        """The same weights described with smaller groups (each scale repeated); exact."""
        if group_size == self.group_size:
            return self
        if self.group_size % group_size:
            raise ValueError(f"cannot regroup {self.group_size}-weight groups into groups of {group_size}")
        repeat = self.group_size // group_size
        offsets = None if self.offsets is None else self.offsets.repeat_interleave(repeat, dim=1)
        base = self.to_int8()
        return PackedWeight(base.codes, self.scales.repeat_interleave(repeat, dim=1), offsets, group_size,
                            input_order=self.input_order)

    def rows(self, index: torch.Tensor | slice) -> PackedWeight:
        """The weights of the given output rows (e.g. to undo a row permutation)."""
        offsets = None if self.offsets is None else self.offsets[index]
        return PackedWeight(self.codes[index], self.scales[index], offsets, self.group_size, self.bits,
                            self.input_order)

    def columns(self, start: int, stop: int) -> PackedWeight | torch.Tensor:
        """The weights of input columns [start, stop) (a row-parallel shard). Still packed when the cut
        falls on group boundaries; otherwise only the groups it touches are dequantized (float32)."""
        if start == 0 and stop == self.shape[1]:   # all of them (one rank)
            return self
        if self.input_order is not None:
            raise ValueError("act-order (desc_act) GPTQ weights cannot be split by input columns")
        group = self.group_size
        if start % group == 0 and stop % group == 0:
            offsets = None if self.offsets is None else self.offsets[:, start // group:stop // group]
            scales = self.scales[:, start // group:stop // group]
            # NOTE: a 4-bit group is its own 16 bytes (GGUF's layout), so whole groups slice as bytes.
            codes = self.codes[:, start * self.bits // 8:stop * self.bits // 8]
            return PackedWeight(codes.contiguous(), scales.contiguous(),
                                None if offsets is None else offsets.contiguous(), group, self.bits)
        first, last = start // group * group, -(-stop // group) * group
        touched = self.columns(first, last)
        assert isinstance(touched, PackedWeight)
        return touched.dequantize()[:, start - first:stop - first]


def pack_int4(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
              input_order: torch.Tensor | None = None) -> PackedWeight:
    """4-bit integer weights w = scale * (code - zero), as AWQ and GPTQ define them, as a 4-bit PackedWeight.

    codes: [out, in] values 0..15; scales, zeros: [out, in // group_size]. `group_size` must be a multiple
    of 32: each group is split into 32-weight groups that repeat its scale and offset (-scale * zero),
    which is exact, because the kernel's 4-bit layout has one scale and offset per 32 weights.
    With `input_order`, codes are already sorted by it (see PackedWeight.input_order).
    """
    rows, cols = codes.shape
    if group_size % 32 or cols % group_size:
        raise ValueError(f"4-bit groups of {group_size} weights over {cols} inputs cannot be split into groups of 32")
    repeat = group_size // 32
    scales32 = scales.float().repeat_interleave(repeat, dim=1)               # [out, in // 32]
    offsets32 = (-scales.float() * zeros.float()).repeat_interleave(repeat, dim=1)
    grouped = codes.to(torch.uint8).view(rows, cols // 32, 2, 16)           # [out, groups, halves, 16]
    packed = grouped[:, :, 0, :] | (grouped[:, :, 1, :] << 4)               # weight j low nibble, j + 16 high
    return PackedWeight(packed.reshape(rows, cols // 2).contiguous(), scales32.contiguous(),
                        offsets32.contiguous(), 32, bits=4, input_order=input_order)
