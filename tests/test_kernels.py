"""The C++ CPU kernels and the packed-weight formats against plain torch / the gguf package.

Each instruction-set variant of the kernels (pagedserve/kernels/isa.py) is its own build, and one
process loads one: this module runs in-process on the variant this CPU picks (or $PAGEDSERVE_CPU_ISA),
and `test_kernel_tests_pass_on_every_other_isa` runs it again in a child process for each other
variant, or says it skips one because this CPU lacks the instructions.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from pagedserve.kernels import cpu_kernels_available, kernel_isa
from pagedserve.kernels.isa import ISA_ENV, PREFERENCE, VARIANTS, CpuInfo, choose_variant, this_cpu
from pagedserve.layers import ops
from pagedserve.layers.quant import PackedWeight
from pagedserve.loader.gguf_blocks import _UNPACKERS, pack_blocks


@pytest.fixture(scope="module", autouse=True)
def kernels():
    assert cpu_kernels_available(), "the CPU kernels failed to build"


# ---------------------------------------------------------------- instruction-set variants

# /proc/cpuinfo flags of the two machines these tests run on (abridged to what matters here).
EPYC_FLAGS = ("fpu sse sse2 ssse3 fma cx16 sse4_1 sse4_2 movbe popcnt aes xsave avx f16c rdrand abm sse4a bmi1 "
              "avx2 bmi2 sha_ni xsaveopt xsavec")
XEON_FLAGS = (EPYC_FLAGS + " avx512f avx512dq avx512cd avx512bw avx512vl avx_vnni avx512_bf16 avx512_vnni amx_bf16 "
              "amx_tile amx_int8")


def cpu(flags: str, is_x86: bool = True) -> CpuInfo:
    return CpuInfo(is_x86, frozenset(flags.split()))


def test_the_widest_variant_the_cpu_runs_is_chosen():
    assert choose_variant(cpu(XEON_FLAGS), None).name == "avx512"
    assert choose_variant(cpu(EPYC_FLAGS), None).name == "avx2"
    assert choose_variant(cpu("fpu sse sse2 avx"), None).name == "native"          # no AVX2: portable paths
    assert choose_variant(cpu("fp asimd", is_x86=False), None).name == "native"     # ARM


def test_the_environment_forces_a_variant_the_cpu_runs_and_refuses_others():
    assert choose_variant(cpu(XEON_FLAGS), "avx2").name == "avx2"
    assert choose_variant(cpu(XEON_FLAGS), " AVX512 ").name == "avx512"
    with pytest.raises(ValueError, match=f"{ISA_ENV}=avx512: this CPU cannot run the AVX-512 .* kernels "
                                         r"\(it lacks avx512_vnni, avx512bw, avx512cd, avx512dq, avx512f, avx512vl\)"):
        choose_variant(cpu(EPYC_FLAGS), "avx512")
    with pytest.raises(ValueError, match=f"{ISA_ENV}='sse9': expected one of avx512, avx2, native"):
        choose_variant(cpu(XEON_FLAGS), "sse9")
    with pytest.raises(ValueError, match=r"\(it lacks x86-64\)"):
        choose_variant(cpu("fp asimd", is_x86=False), "avx2")


def test_no_variant_emits_amx_or_native_code_on_x86():
    """AMX faults on the Xeon VMs that report it, and a native build would not run on the other machine."""
    for name in PREFERENCE:
        assert not any("amx" in flag for flag in VARIANTS[name].compile_flags)
    assert all("native" not in " ".join(VARIANTS[name].compile_flags) for name in ("avx2", "avx512"))


def test_the_loaded_kernels_were_compiled_for_their_variant():
    """The variant's flags reached the compiler: the build's own macros name the paths it compiled."""
    expected = {"avx512": "avx512", "avx2": "avx2"}.get(kernel_isa() or "")
    if expected is None:
        pytest.skip(f"the {kernel_isa()} build compiles whatever this CPU has")
    assert torch.ops.pagedserve.compiled_isa() == expected


OTHER_ISAS = [name for name in ("avx512", "avx2") if name != choose_variant(this_cpu(), os.environ.get(ISA_ENV)).name]


@pytest.mark.parametrize("isa", OTHER_ISAS)
def test_kernel_tests_pass_on_every_other_isa(isa):
    """This module again in a child process on the `isa` build (built into its own cache directory on
    first use); skipped, saying why, where this CPU lacks the variant's instructions."""
    lacking = VARIANTS[isa].missing_flags(this_cpu().flags)
    if lacking:
        pytest.skip(f"this CPU cannot run the {isa} kernels (it lacks {', '.join(lacking)})")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(Path(__file__)),
               "-k", "not test_kernel_tests_pass_on_every_other_isa"]
    # NOTE: bounded, so a hung build or test fails here rather than stalling the suite.
    result = subprocess.run(command, env=os.environ | {ISA_ENV: isa}, cwd=Path(__file__).parent.parent,
                            capture_output=True, text=True, timeout=1800)
    assert result.returncode == 0, f"the {isa} kernels failed their tests:\n{result.stdout[-6000:]}{result.stderr[-2000:]}"


def random_blocks(ggml_type: GGMLQuantizationType, rows: int, cols: int, rng) -> np.ndarray:
    """Random raw blocks with finite fp16 scale fields."""
    _, block_bytes = GGML_QUANT_SIZES[ggml_type]
    raw = rng.integers(0, 256, size=(rows, cols // GGML_QUANT_SIZES[ggml_type][0] * block_bytes), dtype=np.uint8)
    blocks = raw.reshape(-1, block_bytes)
    halves = lambda: rng.normal(0, 0.02, size=(blocks.shape[0], 1)).astype(np.float16).view(np.uint8)  # noqa: E731
    if ggml_type == GGMLQuantizationType.Q6_K:
        blocks[:, 208:210] = halves()
    elif ggml_type == GGMLQuantizationType.Q2_K:   # d and dmin come last
        blocks[:, 80:82], blocks[:, 82:84] = halves(), halves()
    elif ggml_type == GGMLQuantizationType.Q3_K:
        blocks[:, 108:110] = halves()
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


PACKED_FORMATS = [(32, True, 8), (32, False, 8), (16, False, 8), (16, True, 8), (32, True, 4), (32, False, 4)]


def rounds_x(num_rows: int) -> bool:
    """Whether the loaded kernels multiply `num_rows` rows with x rounded to int8 levels: one row on
    AVX2 and AVX-512, every count on AVX-512 (VNNI); the rest multiply float x by float weights."""
    return kernel_isa() == "avx512" or (num_rows == 1 and kernel_isa() == "avx2")


def int8_bound(x: torch.Tensor, weights: torch.Tensor, group: int, in_float: torch.Tensor | None = None
               ) -> torch.Tensor:
    """How far each row's product [rows, out] may be off the float64 one when x runs as an int8 code plus
    an int8 residual per weight group, scaled to the group's largest |x| (so each value is off by at most
    max|block| / (127 * 508)), except the values `in_float` marks ([rows, in]), multiplied exactly and
    left out of their block's max; plus float32 rounding of the sums."""
    x = x.double()
    rounded = x if in_float is None else x.masked_fill(in_float, 0.0)
    block_max = rounded.abs().view(x.shape[0], -1, group).amax(2)
    rounding = (block_max.repeat_interleave(group, dim=1) / (127 * 508)) @ weights.abs().t()
    return rounding + 8 * torch.finfo(torch.float32).eps * (x.abs() @ weights.abs().t())


@pytest.mark.parametrize("num_rows", [2, 3, 4, 5, 6, 8, 11, 13, 17, 40, 129])
@pytest.mark.parametrize("group,asymmetric,bits", PACKED_FORMATS)
def test_qlinear_matches_dequantized_matmul(num_rows, group, asymmetric, bits):
    """Leftovers everywhere: 70 outputs (not a multiple of 16-row groups or tiles), row counts that end
    in a partial 4-row tile, 129 rows past a 128-row slice."""
    packed = make_packed(70, 96, group, asymmetric, bits)
    bias = torch.randn(70)
    x = torch.randn(num_rows, 96)
    weights = packed.dequantize().double()
    got = ops.packed_linear(x, packed, bias, use_kernel=True)
    expected = x.double() @ weights.t() + bias.double()
    if rounds_x(num_rows):
        error = (got.double() - expected).abs()
        bound = int8_bound(x, weights, group)
        assert (error <= bound).all(), f"worst error {(error / bound).max().item():.3f}x the bound"
        assert error.max() > 0   # x was rounded: the integer path ran, not a float one
    else:
        # Float x by weights decoded to float: float32 rounding of the product.
        torch.testing.assert_close(got, expected.float(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cols", [32, 96, 128, 160, 576])   # 1.5 and 2.5 64-weight chunks among them
@pytest.mark.parametrize("group,asymmetric,bits", PACKED_FORMATS)
def test_one_row_rounds_x_to_two_int8_levels_per_block(cols, group, asymmetric, bits):
    """One row (decode at concurrency 1) runs on integer dot products; single-level int8 x, as
    llama.cpp uses, would be off by up to 254x the bound here."""
    packed = make_packed(70, cols, group, asymmetric, bits)
    x = torch.randn(1, cols) * 3
    bias = torch.randn(70)
    weights = packed.dequantize().double()
    error = (ops.packed_linear(x, packed, bias, use_kernel=True).double() - (x.double() @ weights.t() + bias))[0].abs()
    bound = int8_bound(x, weights, group)[0]
    assert (error <= bound).all(), f"worst error {(error / bound).max().item():.3f}x the bound"
    assert error.max() > 0   # x was rounded: the integer path ran, not a float one


@pytest.mark.parametrize("num_rows", [1, 2, 5, 17, 130])
@pytest.mark.parametrize("ggml_type", list(_UNPACKERS), ids=lambda t: t.name)
def test_qlinear_multiplies_every_gguf_format_kept_packed(ggml_type, num_rows):
    """Real GGUF blocks as the loader packs them (4-bit or int8 codes, groups of 16 or 32), 37 outputs
    (leftovers after every tile width) and 3 super-blocks of inputs, against the float64 product."""
    rng = np.random.default_rng(3)
    cols = 768
    packed = pack_blocks(random_blocks(ggml_type, 37, cols, rng), ggml_type, cols)
    x = torch.randn(num_rows, cols, generator=torch.Generator().manual_seed(3))
    bias = torch.randn(37, generator=torch.Generator().manual_seed(4))
    weights = packed.dequantize().double()
    error = (ops.packed_linear(x, packed, bias, use_kernel=True).double() - (x.double() @ weights.t() + bias)).abs()
    # NOTE: a float32 dot of 768 terms rounds by a few ulps of the sum of |terms| (K-quant blocks with
    # random scale bytes make those sums large); a wrong code or scale is off by a whole weight.
    bound = 8 * torch.finfo(torch.float32).eps * (x.double().abs() @ weights.abs().t() + bias.abs())
    if rounds_x(num_rows):
        bound = int8_bound(x, weights, packed.group_size) + bound
    assert (error <= bound).all(), f"worst error {(error / bound).max():.2f}x the float32 rounding bound"


def pack_four_bit(codes: torch.Tensor) -> torch.Tensor:
    """int codes 0..15 [rows, cols] -> GGUF's Q4 bytes (byte j of a 32-group: weight j low, j + 16 high)."""
    rows, cols = codes.shape
    grouped = codes.to(torch.uint8).view(rows, cols // 32, 2, 16)
    return (grouped[:, :, 0] | (grouped[:, :, 1] << 4)).reshape(rows, cols // 2)


@pytest.mark.parametrize("num_rows", [1, 3, 16, 150])
@pytest.mark.parametrize("bits,asymmetric", [(4, True), (8, False), (8, True)])
def test_qlinear_keeps_the_small_values_beside_an_outlier_channel(num_rows, bits, asymmetric):
    """Gemma 3's normed activations hold channels hundreds of times the rest (290 beside ~0.2), and its
    weights on those channels are small: the values beside the outlier carry the result. Rounded to
    one int16 level per 32 values they lost ~1% each (logprobs 6e-4 off transformers')."""
    gen = torch.Generator().manual_seed(1)
    rows, cols = 48, 128
    x = torch.randn(num_rows, cols, generator=gen) * 0.2
    x[:, 5] = 290.0                                       # an outlier channel in the first block
    x[:, 70] = -150.0                                     # and one in the third
    if bits == 4:
        codes = torch.randint(0, 16, (rows, cols), generator=gen)
        codes[:, [5, 70]] = 0                             # weight = the group's (small) offset
        scales = torch.rand(rows, cols // 32, generator=gen) * 0.02 + 0.005
        offsets = -(torch.rand(rows, cols // 32, generator=gen) * 0.002)
        packed = PackedWeight(pack_four_bit(codes), scales, offsets, 32, 4)
    else:
        codes = torch.randint(-64, 64, (rows, cols), dtype=torch.int8, generator=gen)
        codes[:, [5, 70]] = 0
        scales = torch.rand(rows, cols // 32, generator=gen) * 0.01 + 0.002
        offsets = torch.zeros_like(scales) if asymmetric else None
        packed = PackedWeight(codes, scales, offsets, 32, 8)
    weights = packed.dequantize().double()
    assert weights[:, [5, 70]].abs().max() <= 0.01 * weights.abs().max()
    expected = x.double() @ weights.t()
    got = ops.packed_linear(x, packed, None, use_kernel=True).double()
    if rounds_x(num_rows):
        # The outliers must run in float: rounded with the rest, to steps of 290 / (127 * 254), the values
        # beside them would be off over 100x this bound. One row keeps their whole blocks (0 and 2) in
        # float; several rows on AVX-512 only the outliers, the rest of the block rounded at its own scale.
        error = (got - expected).abs()
        in_float = torch.zeros_like(x, dtype=torch.bool)
        if num_rows == 1:
            in_float[:, :32] = in_float[:, 64:96] = True
        else:
            in_float[:, [5, 70]] = True
        bound = int8_bound(x, weights, 32, in_float)
        assert (error <= bound).all(), f"worst error {(error / bound).max().item():.3f}x the bound"
    else:
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


# Large values per block beside ~0.4s: 1, 2 and 3, then five, of which at most four are set aside (the
# fifth, 40, rounds with the rest of its block).
SPIKES = [[290.0], [290.0, -200.0], [290.0, -250.0, 220.0], [2000.0, 1000.0, -500.0, 300.0, 40.0]]


@pytest.mark.parametrize("num_rows", [1, 2, 5, 17])
@pytest.mark.parametrize("group,asymmetric,bits", PACKED_FORMATS)
def test_qlinear_multiplies_a_blocks_few_large_values_in_float(num_rows, group, asymmetric, bits):
    """SmolLM2's activations flag 10-38% of blocks per projection, nearly all for one to three large
    values. Several rows on AVX-512 multiply just those in float, at their own place in each row, and
    round the rest of the block at the rest's scale; one row keeps each such block in float whole. Weights on those channels are not small here: a wrong column would
    be off by ~290 * 0.05."""
    packed = make_packed(40, 8 * group, group, asymmetric, bits)
    weights = packed.dequantize().double()
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(num_rows, 8 * group, generator=gen) * 0.5
    in_float = torch.zeros_like(x, dtype=torch.bool)
    for r in range(num_rows):
        for b, values in enumerate(SPIKES):
            at = [b * group + (r * 7 + i * 5) % group for i in range(len(values))]   # a different place per row
            x[r, at] = torch.tensor(values)
            if num_rows == 1:
                in_float[r, b * group:(b + 1) * group] = True
            else:
                in_float[r, at[:4]] = True
    error = (ops.packed_linear(x, packed, None, use_kernel=True).double() - x.double() @ weights.t()).abs()
    if rounds_x(num_rows):
        bound = int8_bound(x, weights, group, in_float)
        assert (error <= bound).all(), f"worst error {(error / bound).max().item():.3f}x the bound"
    else:
        assert (error <= 8 * torch.finfo(torch.float32).eps * (x.double().abs() @ weights.abs().t())).all()


@pytest.mark.parametrize("num_rows", [5, 16, 27, 140])
def test_qlinear_with_many_weight_chunks(num_rows):
    """600 weight rows of 1 KB: several L2-sized blocks on the streaming path (up to 128 rows, in 4-row
    tiles), the last one partial, and several cache-sized chunks on the GEMM path (140 rows)."""
    packed = make_packed(600, 2048, 32, True, 4)
    x = torch.randn(num_rows, 2048)
    got = ops.packed_linear(x, packed, None, use_kernel=True)
    if rounds_x(num_rows):
        weights = packed.dequantize().double()
        error = (got.double() - x.double() @ weights.t()).abs()
        bound = int8_bound(x, weights, 32)
        assert (error <= bound).all(), f"worst error {(error / bound).max().item():.3f}x the bound"
    else:
        torch.testing.assert_close(got, x @ packed.dequantize().t(), rtol=1e-4, atol=1e-4)


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
    got = ops.paged_decode_attention(q, k_cache, v_cache, tables, lens, 0.25, window, softcap, use_kernel=True)
    expected = reference_decode(q, k_cache, v_cache, tables, lens, 0.25, window, softcap)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_fused_elementwise_ops_match_torch():
    torch.manual_seed(0)
    x, residual, weight = torch.randn(5, 64), torch.randn(5, 64), torch.rand(64) + 0.5
    expected_residual = x + residual
    expected = expected_residual * torch.rsqrt(expected_residual.pow(2).mean(-1, keepdim=True) + 1e-6) * weight
    normed, new_residual = ops.add_rms_norm(x.clone(), residual.clone(), weight, 1e-6, use_kernel=True)
    torch.testing.assert_close(new_residual, expected_residual)
    torch.testing.assert_close(normed, expected, rtol=1e-5, atol=1e-5)

    gate_up = torch.randn(5, 2 * 48)
    gate, up = gate_up.chunk(2, dim=-1)
    torch.testing.assert_close(ops.silu_and_mul(gate_up, use_kernel=True), torch.nn.functional.silu(gate) * up)
    torch.testing.assert_close(ops.gelu_tanh_and_mul(gate_up, use_kernel=True),
                               torch.nn.functional.gelu(gate, approximate="tanh") * up, rtol=1e-5, atol=1e-6)

    qkv = torch.randn(5, 3 * 32)                            # a strided slice, as the models pass it
    q = qkv[:, :64]
    freqs = torch.arange(5).float()[:, None] * torch.rand(8)[None, :]
    cos, sin = freqs.cos(), freqs.sin()
    expected_q = ops.rotary(q.clone(), cos, sin, 16, use_kernel=False)
    torch.testing.assert_close(ops.rotary(q, cos, sin, 16, use_kernel=True), expected_q)


# ---------------------------------------------------------------- the fused decoder layer

def tiny_decoder_layer(qk_norm: bool = False, attention_bias: bool = False, sliding_window: int | None = None):
    """A Llama decoder layer (4 heads, 2 kv heads of 16, hidden 64) with random 4-bit packed projections
    and a 16-block KV cache of 4-token blocks."""
    from pagedserve.config import ModelConfig
    from pagedserve.models.llama import LlamaDecoderLayer

    config = ModelConfig(architecture="LlamaForCausalLM", model_type="llama", vocab_size=96, hidden_size=64,
                         intermediate_size=96, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, rms_norm_eps=1e-5, max_position_embeddings=256, rope_theta=10000.0,
                         attention_bias=attention_bias, qk_norm=qk_norm, sliding_windows=(sliding_window,))
    layer = LlamaDecoderLayer(config, 0)
    gen = torch.Generator().manual_seed(0)
    for seed, projection in enumerate((layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj,
                                       layer.mlp.down_proj)):
        projection.packed = make_packed(projection.out_features, projection.in_features, 32, True, 4, seed)
        projection.weight = None
        if projection.bias is not None:
            projection.bias.data.normal_(0, 0.1, generator=gen)
    norms = [layer.input_layernorm, layer.post_attention_layernorm]
    norms += [layer.self_attn.q_norm, layer.self_attn.k_norm] if qk_norm else []
    for norm in norms:
        norm.weight.data.uniform_(0.5, 1.5, generator=gen)
    layer.self_attn.attn.k_cache = torch.randn(16, 4, 2, 16, generator=gen)
    layer.self_attn.attn.v_cache = torch.randn(16, 4, 2, 16, generator=gen)
    return layer


def decode_step(lens: list[int], block_size: int = 4):
    """Decode-only metadata: sequence b owns blocks 4b.., its new token at position lens[b] - 1."""
    from pagedserve.layers.forward_context import AttentionMetadata

    context_lens = torch.tensor(lens)
    tables = torch.stack([torch.arange(4) + 4 * b for b in range(len(lens))])         # [num_seqs, 4]
    last = context_lens - 1                                                           # the new token's position
    slots = tables[torch.arange(len(lens)), last // block_size] * block_size + last % block_size
    return AttentionMetadata(slot_mapping=slots, num_decodes=len(lens), decode_block_tables=tables,
                             decode_context_lens=context_lens, prefills=[])


@pytest.mark.parametrize("variant", [{}, {"qk_norm": True}, {"attention_bias": True}, {"sliding_window": 5}],
                         ids=["llama", "qwen3", "qwen2", "sliding"])
@pytest.mark.parametrize("first_layer", [True, False])
def test_fused_decode_layer_matches_the_layer_op_by_op(variant, first_layer):
    """The one C++ call computes exactly what the Python layer computes with the same kernels."""
    from pagedserve.layers.forward_context import ForwardContext, forward_context
    from pagedserve.models.llama_fused import fused_decode_layer

    layer = tiny_decoder_layer(**variant)
    attn = layer.self_attn.attn
    metadata = decode_step([1, 6, 13])
    gen = torch.Generator().manual_seed(1)
    hidden, residual = torch.randn(3, 64, generator=gen), torch.randn(3, 64, generator=gen)
    positions = metadata.decode_context_lens - 1
    freqs = positions[:, None].float() * torch.rand(8, generator=gen)[None, :]        # [num_seqs, head_dim / 2]
    cos_sin = (freqs.cos(), freqs.sin())
    caches = attn.k_cache.clone(), attn.v_cache.clone()

    def run(fused) -> tuple[torch.Tensor, ...]:
        attn.k_cache, attn.v_cache = caches[0].clone(), caches[1].clone()
        layer.fused_decode = fused
        with torch.inference_mode(), forward_context(ForwardContext(metadata, use_cpu_kernels=True)):
            out, new_residual = layer(cos_sin, hidden.clone(), None if first_layer else residual.clone())
        return out, new_residual, attn.k_cache, attn.v_cache

    fused = fused_decode_layer(layer)
    assert fused is not None
    for got, expected in zip(run(fused), run(None)):
        assert torch.equal(got, expected)


def tiny_gemma3_layer(sliding_window: int | None = None):
    """A Gemma 3 decoder layer (2 heads sharing 1 kv head of 64, hidden 64, so o_proj maps 128 -> 64), q/k/v
    as 8-bit codes in groups of 16 (Q6_K-like), the rest 4-bit, 6 norms holding 1 + w, a 16-block cache."""
    from pagedserve.config import ModelConfig
    from pagedserve.models.gemma3 import Gemma3DecoderLayer

    config = ModelConfig(architecture="Gemma3ForCausalLM", model_type="gemma3_text", vocab_size=96, hidden_size=64,
                         intermediate_size=96, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=64, rms_norm_eps=1e-6, max_position_embeddings=256, rope_theta=1e6,
                         hidden_act="gelu_pytorch_tanh", query_pre_attn_scalar=48.0, local_rope_theta=1e4,
                         sliding_windows=(sliding_window,))
    layer = Gemma3DecoderLayer(config, 0)
    attn, mlp = layer.self_attn, layer.mlp
    for seed, (projection, group, bits) in enumerate(((attn.qkv_proj, 16, 8), (attn.o_proj, 32, 4),
                                                      (mlp.gate_up_proj, 32, 4), (mlp.down_proj, 32, 4))):
        projection.packed = make_packed(projection.out_features, projection.in_features, group, True, bits, seed)
        projection.weight = None
    gen = torch.Generator().manual_seed(0)
    for norm in (layer.input_layernorm, layer.post_attention_layernorm, layer.pre_feedforward_layernorm,
                 layer.post_feedforward_layernorm, attn.q_norm, attn.k_norm):
        norm.weight.data.uniform_(0.5, 1.5, generator=gen)
    attn.attn.k_cache = torch.randn(16, 4, 1, 64, generator=gen)
    attn.attn.v_cache = torch.randn(16, 4, 1, 64, generator=gen)
    return layer


def run_decode_layer(layer, fused, first_layer: bool, use_cpu_kernels: bool = True) -> tuple[torch.Tensor, ...]:
    """One decode step of three sequences (1, 6 and 13 tokens long) through the layer, fused or in
    Python (with the kernels or plain torch): (output, residual, k_cache, v_cache)."""
    from pagedserve.layers.forward_context import ForwardContext, forward_context

    attn = layer.self_attn.attn
    metadata = decode_step([1, 6, 13])
    gen = torch.Generator().manual_seed(1)
    hidden_size = layer.input_layernorm.weight.shape[0]
    hidden, residual = torch.randn(3, hidden_size, generator=gen), torch.randn(3, hidden_size, generator=gen)
    positions = metadata.decode_context_lens - 1
    freqs = positions[:, None].float() * torch.rand(attn.head_dim // 2, generator=gen)[None, :]  # [3, head_dim / 2]
    caches = attn.k_cache.clone(), attn.v_cache.clone()
    layer.fused_decode = fused
    with torch.inference_mode(), forward_context(ForwardContext(metadata, use_cpu_kernels=use_cpu_kernels)):
        out, new_residual = layer((freqs.cos(), freqs.sin()), hidden, None if first_layer else residual)
    result = out, new_residual, attn.k_cache, attn.v_cache
    attn.k_cache, attn.v_cache = caches
    return result


def layer_tolerance() -> dict[str, float]:
    """How close a decode layer of three sequences comes to plain float torch. Float x: float32 rounding.
    x rounded to int8 levels (rounds_x; each projection within int8_bound, ~3e-4 on these outputs of ~8):
    through four projections, the norms and attention, up to ~2e-3. A wrong weight or wire is off by ~1."""
    return dict(rtol=1e-3, atol=3e-3) if rounds_x(3) else dict(rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("sliding_window", [None, 5], ids=["global", "sliding"])
@pytest.mark.parametrize("first_layer", [True, False])
def test_fused_gemma3_layer_matches_the_layer_op_by_op_and_in_float(sliding_window, first_layer):
    """The one C++ call computes exactly what the Python Gemma 3 layer computes with the same kernels, and
    what it computes in plain float torch (dequantized weights) to float32 rounding."""
    from pagedserve.models.gemma3 import gemma3_fused_decode_layer

    layer = tiny_gemma3_layer(sliding_window)
    fused = gemma3_fused_decode_layer(layer)
    assert fused is not None
    got = run_decode_layer(layer, fused, first_layer)
    for value, expected in zip(got, run_decode_layer(layer, None, first_layer)):
        assert torch.equal(value, expected)
    for value, expected in zip(got, run_decode_layer(layer, None, first_layer, use_cpu_kernels=False)):
        torch.testing.assert_close(value, expected, **layer_tolerance())


def test_fused_llama_layer_matches_the_layer_in_float():
    from pagedserve.models.llama_fused import fused_decode_layer

    layer = tiny_decoder_layer(qk_norm=True, sliding_window=5)
    got = run_decode_layer(layer, fused_decode_layer(layer), first_layer=False)
    for value, expected in zip(got, run_decode_layer(layer, None, first_layer=False, use_cpu_kernels=False)):
        torch.testing.assert_close(value, expected, **layer_tolerance())


def gemma3_layer_args(layer) -> dict:
    attn, mlp = layer.self_attn, layer.mlp
    linear = lambda projection: torch.classes.pagedserve.PackedLinear(**packed_linear_args(projection))  # noqa: E731
    return dict(input_norm=layer.input_layernorm.weight, post_attention_norm=layer.post_attention_layernorm.weight,
                pre_feedforward_norm=layer.pre_feedforward_layernorm.weight,
                post_feedforward_norm=layer.post_feedforward_layernorm.weight, qkv_proj=linear(attn.qkv_proj),
                o_proj=linear(attn.o_proj), gate_up_proj=linear(mlp.gate_up_proj), down_proj=linear(mlp.down_proj),
                q_norm=attn.q_norm.weight, k_norm=attn.k_norm.weight, num_heads=2, num_kv_heads=1, head_dim=64,
                sliding_window=None, eps=1e-6, scale=48 ** -0.5)


@pytest.mark.parametrize("change, message", [
    (dict(pre_feedforward_norm=torch.ones(32)),
     r"Gemma3DecodeLayer: pre_feedforward_norm must have size 64 in dim 0, got shape \[32\]"),
    (dict(post_feedforward_norm=torch.ones(64, dtype=torch.float64)),
     "Gemma3DecodeLayer: post_feedforward_norm must be Float, got Double"),
    (dict(q_norm=torch.ones(32)), r"Gemma3DecodeLayer: q_norm must have size 64 in dim 0"),
    (dict(k_norm=None), "Gemma3DecodeLayer: k_norm is missing"),
    (dict(num_kv_heads=2), "Gemma3DecodeLayer: qkv_proj must map 64 inputs to 384 outputs, got 64 -> 256"),
    (dict(gate_up_proj="o_proj"), "Gemma3DecodeLayer: gate_up_proj must map 64 inputs to 64 outputs, got 128 -> 64"),
])
def test_fused_gemma3_layer_checks_its_weights_once(change, message):
    args = gemma3_layer_args(tiny_gemma3_layer())
    kernel = torch.classes.pagedserve.Gemma3DecodeLayer(**args)      # as built, it is accepted
    with pytest.raises(RuntimeError, match=r"Gemma3DecodeLayer\.forward: hidden must have size 64 in dim 1"):
        kernel.forward(**(step_args(tiny_decoder_layer()) | dict(hidden=torch.randn(2, 32))))
    change = {name: args[value] if isinstance(value, str) else value for name, value in change.items()}
    with pytest.raises(RuntimeError, match=message):
        torch.classes.pagedserve.Gemma3DecodeLayer(**(args | change))


def packed_linear_args(projection) -> dict:
    packed = projection.packed
    return dict(codes=packed.codes, scales=packed.scales, offsets=packed.offsets, bias=projection.bias,
                group_size=packed.group_size, bits=packed.bits)


def decode_layer_args(layer) -> dict:
    attn, mlp = layer.self_attn, layer.mlp
    linear = lambda projection: torch.classes.pagedserve.PackedLinear(**packed_linear_args(projection))  # noqa: E731
    return dict(input_norm=layer.input_layernorm.weight, post_norm=layer.post_attention_layernorm.weight,
                qkv_proj=linear(attn.qkv_proj), o_proj=linear(attn.o_proj), gate_up_proj=linear(mlp.gate_up_proj),
                down_proj=linear(mlp.down_proj), q_norm=None, k_norm=None, num_heads=4, num_kv_heads=2, head_dim=16,
                sliding_window=None, eps=1e-5, scale=0.25)


@pytest.mark.parametrize("change, message", [
    (dict(codes=torch.zeros(64, 32, dtype=torch.int8)), "PackedLinear: codes must be Byte, got Char"),
    (dict(scales=torch.zeros(64, 3)), r"PackedLinear: scales must have size 2 in dim 1, got shape \[64, 3\]"),
    (dict(scales=torch.zeros(2, 64).t()), "PackedLinear: scales must be contiguous"),
    (dict(offsets=torch.zeros(64, 2, dtype=torch.float64)), "PackedLinear: offsets must be Float, got Double"),
    (dict(bias=torch.zeros(63)), r"PackedLinear: bias must have size 64 in dim 0, got shape \[63\]"),
    (dict(group_size=16), "PackedLinear: 8-bit codes in groups of 16 or 32, or 4-bit codes in groups of 32"),
    (dict(codes=None), "PackedLinear: codes is missing"),
])
def test_packed_linear_checks_its_weights(change, message):
    args = packed_linear_args(tiny_decoder_layer().self_attn.o_proj) | {"bias": torch.zeros(64)}
    torch.classes.pagedserve.PackedLinear(**args)      # as built, it is accepted
    with pytest.raises(RuntimeError, match=message):
        torch.classes.pagedserve.PackedLinear(**(args | change))


@pytest.mark.parametrize("change, message", [
    (dict(post_norm=torch.ones(32)), r"LlamaDecodeLayer: post_norm must have size 64 in dim 0, got shape \[32\]"),
    (dict(input_norm=torch.ones(64, dtype=torch.float16)), "LlamaDecodeLayer: input_norm must be Float, got Half"),
    (dict(num_kv_heads=4), "LlamaDecodeLayer: qkv_proj must map 64 inputs to 192 outputs, got 64 -> 128"),
    (dict(head_dim=8), "LlamaDecodeLayer: qkv_proj must map 64 inputs to 64 outputs, got 64 -> 128"),
    (dict(num_heads=3), "num_heads must be a positive multiple of num_kv_heads, got 3 and 2"),
    (dict(q_norm=torch.ones(16)), r"q_norm and k_norm come together \(got q_norm only\)"),
    (dict(sliding_window=0), "sliding_window must be None or positive, got 0"),
    (dict(scale=None), "Expected a value of type 'float' for argument 'scale'"),
])
def test_fused_decode_layer_checks_its_weights_once(change, message):
    args = decode_layer_args(tiny_decoder_layer())
    torch.classes.pagedserve.LlamaDecodeLayer(**args)      # as built, it is accepted
    with pytest.raises(RuntimeError, match=message):
        torch.classes.pagedserve.LlamaDecodeLayer(**(args | change))


def test_fused_decode_layer_names_a_missing_argument_and_rejects_swapped_projections():
    args = decode_layer_args(tiny_decoder_layer())
    with pytest.raises(RuntimeError, match="missing value for argument 'scale'"):
        torch.classes.pagedserve.LlamaDecodeLayer(**{name: value for name, value in args.items() if name != "scale"})
    with pytest.raises(RuntimeError, match="LlamaDecodeLayer: o_proj must map 64 inputs to 64 outputs, got 64 -> 128"):
        torch.classes.pagedserve.LlamaDecodeLayer(**(args | dict(o_proj=args["qkv_proj"])))
    with pytest.raises(RuntimeError, match="LlamaDecodeLayer: down_proj must map 96 inputs to 64 outputs"):
        torch.classes.pagedserve.LlamaDecodeLayer(**(args | dict(down_proj=args["o_proj"])))


def step_args(layer) -> dict:
    metadata = decode_step([1, 6])
    return dict(hidden=torch.randn(2, 64), residual=torch.randn(2, 64), first_layer=False, cos=torch.ones(2, 8),
                sin=torch.zeros(2, 8), k_cache=layer.self_attn.attn.k_cache, v_cache=layer.self_attn.attn.v_cache,
                slot_mapping=metadata.slot_mapping, block_tables=metadata.decode_block_tables,
                context_lens=metadata.decode_context_lens)


@pytest.mark.parametrize("change, message", [
    (dict(hidden=torch.randn(2, 64, dtype=torch.float64)), r"Layer\.forward: hidden must be Float, got Double"),
    (dict(hidden=torch.randn(2, 32)), r"hidden must have size 64 in dim 1, got shape \[2, 32\]"),
    (dict(residual=torch.randn(3, 64)), r"residual must have the shape of hidden \[2, 64\], got \[3, 64\]"),
    (dict(cos=torch.ones(2, 16)), r"cos and sin must be \[2, 8\], got \[2, 16\] and \[2, 8\]"),
    (dict(k_cache=torch.zeros(16, 4, 4, 16)), r"k_cache must have size 2 in dim 2, got shape \[16, 4, 4, 16\]"),
    (dict(v_cache=torch.zeros(8, 4, 2, 16)), r"v_cache must have the shape of k_cache"),
    (dict(k_cache=torch.zeros(16, 2, 4, 16).transpose(1, 2)), "k_cache must be contiguous"),
    (dict(slot_mapping=torch.tensor([0, 64])), r"slot_mapping\[1\] = 64 is not a slot of the cache \(64 slots\)"),
    (dict(slot_mapping=torch.tensor([0, 1], dtype=torch.int32)), "slot_mapping must be Long, got Int"),
    (dict(context_lens=torch.tensor([1, 17])), r"context_lens\[1\] = 17 must be in \[1, 16\]"),
    (dict(block_tables=torch.tensor([[0, 1, 2, 3], [4, 99, 6, 7]])),
     r"block_tables\[1, 1\] = 99 is not a block of the cache \(16 blocks\)"),
    (dict(block_tables=torch.zeros(3, 4, dtype=torch.long)), r"block_tables must have size 2 in dim 0"),
    (dict(cos=None), "LlamaDecodeLayer.forward: cos is missing"),
])
def test_fused_decode_layer_checks_each_step(change, message):
    layer = tiny_decoder_layer()
    kernel = torch.classes.pagedserve.LlamaDecodeLayer(**decode_layer_args(layer))
    kernel.forward(**step_args(layer))
    with pytest.raises(RuntimeError, match=message):
        kernel.forward(**(step_args(layer) | change))


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
