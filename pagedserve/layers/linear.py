"""Linear layers whose parameters load their own shards (fused QKV and gate/up projections).

A matrix arrives from the loader either as a float tensor or as a PackedWeight (quantized GGUF
blocks, kept packed when the CPU kernels can use them). A layer stays packed only while every shard
it receives is packed; one float shard turns it into a plain float layer.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.distributed import current_model_parallel
from pagedserve.layers import ops
from pagedserve.layers.forward_context import get_forward_context
from pagedserve.layers.lora import LoRAPair, apply_lora
from pagedserve.layers.quant import PackedWeight
from pagedserve.layers.weight_loader import set_weight_loader


class PackableWeight(nn.Module):
    """A [out_features, in_features] weight that is either a float Parameter or a PackedWeight."""

    def __init__(self, out_features: int, in_features: int, shard_sizes: dict[str, int] | None) -> None:
        super().__init__()
        self.out_features = out_features
        self.in_features = in_features
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for shard_id, size in (shard_sizes or {}).items():
            self.shard_offsets[shard_id] = (offset, size)
            offset += size
        if shard_sizes and offset != out_features:
            raise ValueError(f"shard sizes add up to {offset}, not out_features={out_features}")
        # NOTE: torch.empty leaves the pages untouched, so a layer that ends up packed never pays for them.
        weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight: nn.Parameter | None = set_weight_loader(weight, self._load_shard)
        self.packed: PackedWeight | None = None
        self._has_float_shard = False

    def _rows(self, shard_id: str | None) -> slice:
        if shard_id is None:
            return slice(0, self.out_features)
        offset, size = self.shard_offsets[shard_id]
        return slice(offset, offset + size)

    def _load_shard(self, param: nn.Parameter, loaded: torch.Tensor | PackedWeight, shard_id: str | None = None) -> None:
        rows = self._rows(shard_id)
        expected = (rows.stop - rows.start, self.in_features)
        if tuple(loaded.shape) != expected:
            raise ValueError(f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit a parameter of "
                             f"shape {expected}")
        if isinstance(loaded, PackedWeight) and not self._has_float_shard and self._same_input_order(loaded):
            self._store_packed(loaded, rows)
            return
        if isinstance(loaded, PackedWeight):
            loaded = loaded.dequantize()
        if self.packed is not None:   # earlier shards were packed: this layer becomes a float layer
            param.data.copy_(self.packed.dequantize())
            self.packed = None
        self._has_float_shard = True
        param.data[rows].copy_(loaded)

    def _same_input_order(self, loaded: PackedWeight) -> bool:
        """Shards share x, so packed ones must agree on its order (act-order GPTQ); else the layer is float."""
        if self.packed is None:
            return True
        mine, theirs = self.packed.input_order, loaded.input_order
        return mine is theirs or (mine is not None and theirs is not None and torch.equal(mine, theirs))

    def _store_packed(self, loaded: PackedWeight, rows: slice) -> None:
        if self.packed is None:
            groups = self.in_features // loaded.group_size
            self.packed = PackedWeight(
                codes=torch.empty(self.out_features, self.in_features * loaded.bits // 8, dtype=loaded.codes.dtype),
                scales=torch.zeros(self.out_features, groups),
                offsets=None if loaded.offsets is None else torch.zeros(self.out_features, groups),
                group_size=loaded.group_size, bits=loaded.bits, input_order=loaded.input_order)
        # Shards may differ (e.g. Q4_K q/k beside Q6_K v): keep the finer grouping, and 8-bit codes
        # unless every shard is 4-bit.
        if loaded.bits != self.packed.bits:
            self.packed, loaded = self.packed.to_int8(), loaded.to_int8()
        if loaded.group_size < self.packed.group_size:
            self.packed = self.packed.regroup(loaded.group_size)
        loaded = loaded.regroup(self.packed.group_size)
        if loaded.offsets is not None and self.packed.offsets is None:
            self.packed = dataclasses.replace(self.packed, offsets=torch.zeros_like(self.packed.scales))
        self.packed.codes[rows].copy_(loaded.codes)
        self.packed.scales[rows].copy_(loaded.scales)
        if self.packed.offsets is not None:
            if loaded.offsets is not None:
                self.packed.offsets[rows].copy_(loaded.offsets)
            else:
                self.packed.offsets[rows].fill_(0.0)

    def drop_unused_float_weight(self) -> None:
        """After loading: a packed layer has no use for its float parameter."""
        if self.packed is not None:
            self.weight = None

    def matmul(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x @ W^T + bias: x [..., in_features] -> [..., out_features]."""
        if self.packed is not None:
            return ops.packed_linear(x, self.packed, bias, use_kernel=get_forward_context().use_cpu_kernels)
        assert self.weight is not None, "a layer without float weights is packed"
        return F.linear(x, self.weight, bias)


class Linear(PackableWeight):
    """y = x W^T + b, where W may be several checkpoint tensors stacked along the output dim.

    `shard_sizes` names the stacked pieces in order (e.g. q, k, v); the loader passes the piece's
    name as `shard_id` and the layer copies it into its rows.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 shard_sizes: dict[str, int] | None = None) -> None:
        super().__init__(out_features, in_features, shard_sizes)
        self.bias: nn.Parameter | None = None
        if bias:
            self.bias = set_weight_loader(nn.Parameter(torch.zeros(out_features), requires_grad=False), self._load_bias)
        # LoRA adapters on this layer, by slot (engine/lora.py fills it); plain tensors, not parameters.
        self.lora_pairs: dict[int, list[LoRAPair]] = {}

    def _load_bias(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None) -> None:
        rows = self._rows(shard_id)
        if loaded.shape != (rows.stop - rows.start,):
            raise ValueError(f"bias of shape {tuple(loaded.shape)} does not fit {rows.stop - rows.start} outputs")
        param.data[rows].copy_(loaded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.add_lora(x, self.matmul(x, self.bias))

    def add_lora(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """y plus this step's LoRA deltas of x (subclasses that override forward call it too)."""
        lora = get_forward_context().lora
        if lora is not None and self.lora_pairs:
            y = apply_lora(x, y, self.lora_pairs, lora)
        return y


class VocabEmbedding(PackableWeight):
    """Token embedding; also the output projection when the checkpoint ties them.

    Vocab-parallel under tensor parallelism (the layout the model is built under): each rank holds a
    contiguous slice of ceil(vocab_size / tp) rows, the last one padded. An id outside a rank's slice
    embeds as zeros there and the all-reduce sums the one real row; logits of each slice are gathered.
    """

    def __init__(self, vocab_size: int, hidden_size: int) -> None:
        tp = current_model_parallel().tp
        rows_per_rank = -(-vocab_size // tp.size)
        self.vocab_start = tp.rank * rows_per_rank
        num_real_rows = max(0, min(vocab_size - self.vocab_start, rows_per_rank))
        shards = {"vocab": num_real_rows, "padding": rows_per_rank - num_real_rows} if tp.size > 1 else None
        super().__init__(rows_per_rank, hidden_size, shards)
        self.vocab_size = vocab_size
        self.num_real_rows = num_real_rows
        self.tp = tp
        if tp.size > 1:
            assert self.weight is not None
            set_weight_loader(self.weight, self._load_vocab_slice)

    def _load_vocab_slice(self, param: nn.Parameter, loaded: torch.Tensor | PackedWeight,
                          shard_id: str | None = None) -> None:
        if tuple(loaded.shape) != (self.vocab_size, self.in_features):
            raise ValueError(f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit an embedding of "
                             f"shape {(self.vocab_size, self.in_features)}")
        rows = slice(self.vocab_start, self.vocab_start + self.num_real_rows)
        loaded = loaded.rows(rows) if isinstance(loaded, PackedWeight) else loaded[rows]
        self._load_shard(param, loaded, "vocab")
        if self.packed is None:
            param.data[self.num_real_rows:].zero_()

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size > 1:
            local_ids = input_ids - self.vocab_start
            outside = (local_ids < 0) | (local_ids >= self.num_real_rows)
            embedded = self._embed(local_ids.masked_fill(outside, 0))          # [num_tokens, hidden_size]
            return self.tp.all_reduce(embedded.masked_fill(outside[:, None], 0.0))
        return self._embed(input_ids)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            return self.packed.rows(input_ids).dequantize()       # [num_tokens, hidden_size]
        assert self.weight is not None, "a layer without float weights is packed"
        return F.embedding(input_ids, self.weight)

    def project(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """hidden_states @ W^T: [num_rows, hidden_size] -> [num_rows, vocab_size] logits."""
        logits = self.matmul(hidden_states, None)                 # [num_rows, rows_per_rank]
        if self.tp.size > 1:
            logits = self.tp.all_gather(logits)[:, :self.vocab_size]
        return logits
