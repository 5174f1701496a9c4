"""The C++ CPU kernels and the packed-weight formats against plain torch / the gguf package."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from pagedserve.kernels import cpu_kernels_available
from pagedserve.layers import ops
from pagedserve.layers.quant import PackedWeight
from pagedserve.loader.gguf_blocks import _UNPACKERS, pack_blocks


@pytest.fixture(scope="module", autouse=True)
def kernels():
    assert cpu_kernels_available(), "the CPU kernels failed to build"
    ops.enable_cpu_kernels(True)
    yield
    ops.enable_cpu_kernels(False)


def random_blocks(ggml_type: GGMLQuantizationType, rows: int, cols: int, rng) -> np.ndarray:
    """Random raw blocks with finite fp16 scale fields."""
    _, block_bytes = GGML_QUANT_SIZES[ggml_type]
    raw = rng.integers(0, 256, size=(rows, cols // GGML_QUANT_SIZES[ggml_type][0] * block_bytes), dtype=np.uint8)
    blocks = raw.reshape(-1, block_bytes)
    halves = lambda: rng.normal(0, 0.02, size=(blocks.shape[0], 1)).astype(np.float16).view(np.uint8)  # noqa: E731
    if ggml_type == GGMLQuantizationType.Q6_K:
        blocks[:, 208:210] = halves()
    else:
        blocks[:, :2] = halves()
        if ggml_type in (GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q5_1, GGMLQuantizationType.Q4_K,
                         GGMLQuantizationType.Q5_K):
            blocks[:, 2:4] = halves()
    return raw


@pytest.mark.parametrize("ggml_type", list(_UNPACKERS), ids=lambda t: t.name)
def test_packing_reproduces_gguf_dequantization_exactly(ggml_type):
    rng = np.random.default_rng(0)
    cols = GGML_QUANT_SIZES[ggml_type][0] * 3
    raw = random_blocks(ggml_type, 5, cols, rng)
    expected = gguf.quants.dequantize(raw, ggml_type).reshape(5, cols)
    packed = pack_blocks(raw, ggml_type, cols)
    assert np.array_equal(packed.dequantize().numpy(), expected)


def make_packed(rows: int, cols: int, group: int, asymmetric: bool, bits: int = 8, seed: int = 0) -> PackedWeight:
    gen = torch.Generator().manual_seed(seed)
    if bits == 4:
        codes = torch.randint(0, 256, (rows, cols // 2), dtype=torch.uint8, generator=gen)
    else:
        codes = torch.randint(-32, 32, (rows, cols), dtype=torch.int8, generator=gen)
    scales = torch.rand(rows, cols // group, generator=gen) * 0.05
    offsets = torch.randn(rows, cols // group, generator=gen) * 0.05 if asymmetric else None
    return PackedWeight(codes, scales, offsets, group, bits)


@pytest.mark.parametrize("num_rows", [1, 3, 4, 5, 6, 13, 17, 40])
@pytest.mark.parametrize("group,asymmetric,bits", [(32, True, 8), (32, False, 8), (16, False, 8), (16, True, 8),
                                                  (32, True, 4), (32, False, 4)])
def test_qlinear_matches_dequantized_matmul(num_rows, group, asymmetric, bits):
    packed = make_packed(70, 96, group, asymmetric, bits)   # 70 outputs: not a multiple of any tile
    bias = torch.randn(70)
    x = torch.randn(num_rows, 96)
    got = ops.packed_linear(x, packed, bias)
    if uses_int16_activations(num_rows, group):
        # Exactly the product with x rounded to int16 per 32 values, and within that rounding of the float one.
        torch.testing.assert_close(got, int16_rounded(x) @ packed.dequantize().t() + bias, rtol=1e-5, atol=2e-4)
        torch.testing.assert_close(got, x @ packed.dequantize().t() + bias, rtol=1e-4, atol=2e-3)
    else:
        torch.testing.assert_close(got, x @ packed.dequantize().t() + bias, rtol=1e-5, atol=1e-5)


def uses_int16_activations(num_rows: int, group: int) -> bool:
    """Decode-sized inputs against 32-weight groups: the kernel rounds x to int16 per 32-value block."""
    return num_rows <= 16 and group == 32


def int16_rounded(x: torch.Tensor) -> torch.Tensor:
    blocks = x.reshape(x.shape[0], -1, 32)
    step = blocks.abs().amax(-1, keepdim=True) / 32767
    return (torch.round(blocks / step) * step).reshape(x.shape)


def test_int16_activations_keep_a_block_with_an_outlier_accurate():
    """These models have outlier channels ~100x the rest; the other values of that block must survive."""
    packed = make_packed(64, 128, 32, True, 4)
    x = torch.randn(1, 128) * 0.05
    x[0, 5] = 30.0
    expected = x @ packed.dequantize().t()
    got = ops.packed_linear(x, packed, None)
    assert ((got - expected).norm() / expected.norm()).item() < 1e-4


def test_qlinear_with_many_weight_chunks():
    packed = make_packed(600, 2048, 32, True, 4)             # several cache-sized chunks on the GEMM path
    x = torch.randn(24, 2048)
    torch.testing.assert_close(ops.packed_linear(x, packed, None), x @ packed.dequantize().t(),
                               rtol=1e-4, atol=1e-4)


def test_four_bit_codes_regroup_and_unpack_exactly():
    packed = make_packed(8, 64, 32, True, 4)
    assert packed.shape == (8, 64)
    assert torch.equal(packed.to_int8().dequantize(), packed.dequantize())
    assert torch.equal(packed.regroup(16).dequantize(), packed.dequantize())


def reference_decode(q, k_cache, v_cache, tables, lens, scale, window, softcap):
    num_seqs, num_heads, head_dim = q.shape
    num_kv = k_cache.shape[2]
    out = torch.empty_like(q)
    for b in range(num_seqs):
        length = int(lens[b])
        keys = k_cache[tables[b]].reshape(-1, num_kv, head_dim)[:length]
        values = v_cache[tables[b]].reshape(-1, num_kv, head_dim)[:length]
        first = max(0, length - window) if window else 0
        keys, values = keys[first:], values[first:]
        for h in range(num_heads):
            kv = h // (num_heads // num_kv)
            scores = keys[:, kv] @ q[b, h] * scale
            if softcap:
                scores = torch.tanh(scores / softcap) * softcap
            out[b, h] = scores.softmax(0) @ values[:, kv]
    return out


@pytest.mark.parametrize("head_dim", [16, 64, 96])
@pytest.mark.parametrize("window,softcap", [(None, None), (5, None), (None, 30.0)])
def test_paged_decode_attention_matches_reference(window, softcap, head_dim):
    torch.manual_seed(0)
    num_blocks, block_size, num_kv, num_heads = 20, 4, 2, 6
    k_cache = torch.randn(num_blocks, block_size, num_kv, head_dim)
    v_cache = torch.randn(num_blocks, block_size, num_kv, head_dim)
    lens = torch.tensor([1, 7, 12, 3])
    tables = torch.stack([torch.randperm(num_blocks)[:3] for _ in lens])
    q = torch.randn(len(lens), num_heads, head_dim)
    got = ops.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.25, window, softcap)
    expected = reference_decode(q, k_cache, v_cache, tables, lens, 0.25, window, softcap)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_fused_elementwise_ops_match_torch():
    torch.manual_seed(0)
    x, residual, weight = torch.randn(5, 64), torch.randn(5, 64), torch.rand(64) + 0.5
    expected_residual = x + residual
    expected = expected_residual * torch.rsqrt(expected_residual.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
    normed, new_residual = ops.add_rms_norm(x.clone(), residual.clone(), weight, 1e-6)
    torch.testing.assert_close(new_residual, expected_residual)
    torch.testing.assert_close(normed, expected, rtol=1e-5, atol=1e-5)

    gate_up = torch.randn(5, 2 * 48)
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(ops.silu_and_mul(gate_up), torch.nn.functional.silu(gate) * up)
    torch.testing.assert_close(ops.gelu_tanh_and_mul(gate_up),
                               torch.nn.functional.gelu(gate, approximate="tanh") * up, rtol=1e-5, atol=1e-6)

    qkv = torch.randn(5, 3 * 32)                            # a strided slice, as the models pass it
    q = qkv[:, :64]
    freqs = torch.arange(5).float()[:, None] * torch.rand(8)[None, :]
    cos, sin = freqs.cos(), freqs.sin()
    ops.enable_cpu_kernels(False)
    expected_q = ops.rotary(q.clone(), cos, sin, 16)
    ops.enable_cpu_kernels(True)
    torch.testing.assert_close(ops.rotary(q, cos, sin, 16), expected_q)


def test_ops_check_their_arguments():
    packed = make_packed(8, 64, 32, True, 4)
    with pytest.raises(RuntimeError, match=r"qlinear: x must be \[\.\.\., 64\], got shape \[2, 32\]"):
        torch.ops.pagedserve.qlinear(torch.randn(2, 32), packed.codes, packed.scales, packed.offsets, None, 32, 4)
    narrow_offsets = packed.offsets[:, :1].contiguous()
    with pytest.raises(RuntimeError, match=r"qlinear: offsets must have the shape of scales \[8, 2\], got \[8, 1\]"):
        torch.ops.pagedserve.qlinear(torch.randn(2, 64), packed.codes, packed.scales, narrow_offsets, None, 32, 4)
    q, cache = torch.randn(1, 4, 16), torch.zeros(4, 4, 2, 16)
    with pytest.raises(RuntimeError, match=r"paged_attention: block_tables\[0, 1\] = 4 is not a block of the cache"):
        torch.ops.pagedserve.paged_attention(torch.empty_like(q), q, cache, cache, torch.tensor([[0, 4]]),
                                             torch.tensor([6]), 0.25, None, None)
    with pytest.raises(RuntimeError, match="rms_norm: weight must have size 64 in dim 0"):
        torch.ops.pagedserve.rms_norm(torch.randn(2, 64), torch.ones(32), 1e-6)
    with pytest.raises(RuntimeError, match=r"rotary_inplace: cos and sin must be \[2, 8\]"):
        torch.ops.pagedserve.rotary_inplace(torch.randn(2, 64), torch.ones(3, 8), torch.ones(3, 8), 16)
