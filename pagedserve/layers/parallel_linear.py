"""Tensor-parallel linear layers (Megatron's split, as vLLM does it), each parameter taking its own shard
of the checkpoint's tensor as it loads: rows for column-parallel layers, input columns for row-parallel
ones; quantized GGUF blocks are cut packed (`PackedWeight.rows` / `.columns`), never dequantized whole.

A decoder layer needs one all-reduce for attention and one for the MLP: QKV and gate/up are
column-parallel (each rank computes its heads / its slice of the intermediate size, no communication)
and o_proj / down_proj are row-parallel (each rank's partial product, summed by one all-reduce).
With one rank every class here computes exactly what `Linear` computes.
"""
from __future__ import annotations

import torch
from torch import nn

from pagedserve.distributed import TensorParallel, current_model_parallel
from pagedserve.layers.linear import Linear
from pagedserve.layers.quant import PackedWeight
from pagedserve.layers.weight_loader import set_weight_loader


def _rows_of(loaded: torch.Tensor | PackedWeight, start: int, size: int) -> torch.Tensor | PackedWeight:
    if isinstance(loaded, PackedWeight):
        return loaded.rows(slice(start, start + size))
    return loaded.narrow(0, start, size)


class _ColumnParallel(Linear):
    """A Linear whose output rows are this rank's slice of each named checkpoint piece."""

    def __init__(self, in_features: int, bias: bool, pieces: dict[str, tuple[int, int, int]], tp: TensorParallel
                 ) -> None:
        """`pieces`: name -> (rows in the checkpoint, rows this rank holds, the first of them)."""
        super().__init__(in_features, sum(local for _, local, _ in pieces.values()), bias,
                         shard_sizes={name: local for name, (_, local, _) in pieces.items()})
        self.tp = tp
        self.pieces = pieces
        assert self.weight is not None
        set_weight_loader(self.weight, self._load_piece)
        if self.bias is not None:
            set_weight_loader(self.bias, self._load_bias_piece)

    def _piece(self, loaded: torch.Tensor | PackedWeight, shard_id: str | None) -> torch.Tensor | PackedWeight:
        if shard_id is None:
            raise ValueError(f"a fused weight needs one of {', '.join(self.pieces)}")
        full, local, start = self.pieces[shard_id]
        if loaded.shape[0] != full:
            raise ValueError(f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit {full} rows of "
                             f"{shard_id}")
        return _rows_of(loaded, start, local)

    def _whole(self, loaded: torch.Tensor | PackedWeight) -> list[tuple[str, torch.Tensor | PackedWeight]]:
        """A checkpoint that stores the pieces already fused (Phi-3's qkv_proj, gate_up_proj), cut back into
        its pieces, in order."""
        total = sum(full for full, _, _ in self.pieces.values())
        if loaded.shape[0] != total:
            raise ValueError(f"a fused weight of shape {tuple(loaded.shape)} does not hold {total} rows "
                             f"({', '.join(self.pieces)})")
        cut, start = [], 0
        for name, (full, _, _) in self.pieces.items():
            cut.append((name, _rows_of(loaded, start, full)))
            start += full
        return cut

    def _load_piece(self, param: nn.Parameter, loaded: torch.Tensor | PackedWeight, shard_id: str | None = None
                    ) -> None:
        if shard_id is None:
            for name, whole in self._whole(loaded):
                self._load_piece(param, whole, name)
            return
        self._load_shard(param, self._piece(loaded, shard_id), shard_id)

    def _load_bias_piece(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str | None = None) -> None:
        if shard_id is None:
            for name, whole in self._whole(loaded):
                assert isinstance(whole, torch.Tensor)
                self._load_bias_piece(param, whole, name)
            return
        piece = self._piece(loaded, shard_id)
        assert isinstance(piece, torch.Tensor)
        self._load_bias(param, piece, shard_id)


class QKVParallelLinear(_ColumnParallel):
    """q, k and v projections fused; each rank holds num_heads / tp query heads and num_kv_heads / tp
    key/value heads, or one replicated key/value head when tp > num_kv_heads."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool) -> None:
        tp = current_model_parallel().tp
        check_heads_divide(num_heads, num_kv_heads, tp.size)
        self.num_heads = num_heads // tp.size
        self.num_kv_heads = max(1, num_kv_heads // tp.size)
        # NOTE: with replication, tp / num_kv_heads consecutive ranks share a key/value head.
        kv_head = tp.rank * self.num_kv_heads if num_kv_heads >= tp.size else tp.rank // (tp.size // num_kv_heads)
        q_size, kv_size = self.num_heads * head_dim, self.num_kv_heads * head_dim
        pieces = {"q": (num_heads * head_dim, q_size, tp.rank * q_size),
                  "k": (num_kv_heads * head_dim, kv_size, kv_head * head_dim),
                  "v": (num_kv_heads * head_dim, kv_size, kv_head * head_dim)}
        super().__init__(hidden_size, bias, pieces, tp)


class MergedColumnParallelLinear(_ColumnParallel):
    """Several projections of one input stacked (gate and up), each split evenly across the ranks."""

    def __init__(self, in_features: int, sizes: dict[str, int], bias: bool = False) -> None:
        tp = current_model_parallel().tp
        for name, size in sizes.items():
            if size % tp.size:
                raise ValueError(f"tensor_parallel_size {tp.size} does not divide {name}'s {size} outputs")
        pieces = {name: (size, size // tp.size, tp.rank * (size // tp.size)) for name, size in sizes.items()}
        super().__init__(in_features, bias, pieces, tp)


class RowParallelLinear(Linear):
    """y = sum over ranks of x_r W_r^T, + b: each rank holds in_features / tp input columns and gets its
    slice of x from the column-parallel layer before it; one all-reduce sums the partial products."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        tp = current_model_parallel().tp
        if in_features % tp.size:
            raise ValueError(f"tensor_parallel_size {tp.size} does not divide {in_features} input features")
        self.tp = tp
        self.full_in_features = in_features
        super().__init__(in_features // tp.size, out_features, bias)
        assert self.weight is not None
        set_weight_loader(self.weight, self._load_columns)

    def _load_columns(self, param: nn.Parameter, loaded: torch.Tensor | PackedWeight, shard_id: str | None = None
                      ) -> None:
        if tuple(loaded.shape) != (self.out_features, self.full_in_features):
            raise ValueError(f"checkpoint tensor of shape {tuple(loaded.shape)} does not fit a parameter of "
                             f"shape {(self.out_features, self.full_in_features)}")
        start = self.tp.rank * self.in_features
        columns = loaded.columns(start, start + self.in_features) if isinstance(loaded, PackedWeight) \
            else loaded[:, start:start + self.in_features]
        self._load_shard(param, columns, shard_id)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return self.add_lora(x, self.matmul(x, self.bias))
        # (no LoRA here: the engine refuses adapters with tensor parallel > 1)
        out = self.tp.all_reduce(self.matmul(x, None))          # [num_tokens, out_features]
        return out if self.bias is None else out + self.bias


def check_heads_divide(num_heads: int, num_kv_heads: int, tp_size: int) -> None:
    """Raise ValueError naming the numbers when `tp_size` ranks cannot split the attention heads."""
    if num_heads % tp_size:
        raise ValueError(f"tensor_parallel_size {tp_size} does not divide the model's {num_heads} attention heads")
    if num_kv_heads % tp_size and tp_size % num_kv_heads:
        raise ValueError(f"tensor_parallel_size {tp_size} and the model's {num_kv_heads} key/value heads: one "
                         "must divide the other")
