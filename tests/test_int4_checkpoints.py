"""AWQ and GPTQ int4 checkpoints, written here with the packing those formats define (random 4-bit codes,
zeros and fp16 scales), load packed and give the tokens and logprobs of transformers running the float
model with the same dequantized weights."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from pagedserve import LLM
from pagedserve.layers.linear import Linear
from pagedserve.loader.model_info import describe
from pagedserve.loader.source import resolve_model
from tests.conftest import save_tiny_checkpoint
from tests.parity import check_parity, packed_atol

ENGINE_ARGS = dict(dtype="float32", max_num_batched_tokens=32, num_kv_blocks=256, block_size=4, num_threads=1)
_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]   # AutoAWQ's pack order: nibble i holds column _AWQ_ORDER[i]

pytestmark = pytest.mark.usefixtures("restore_torch_threads")


def _pack_int32(nibbles: np.ndarray) -> np.ndarray:
    """[..., 8] values 0..15 -> [...] int32, value i at bits 4i."""
    words = sum(nibbles[..., i].astype(np.uint64) << np.uint64(4 * i) for i in range(8))
    return words.astype(np.uint32).view(np.int32)


def awq_tensors(codes: np.ndarray, zeros: np.ndarray, scales: np.ndarray) -> dict[str, np.ndarray]:
    """AutoAWQ GEMM layout from codes [out, in], zeros and scales [out, groups]."""
    def pack(columns: np.ndarray) -> np.ndarray:   # [rows, cols] -> [rows, cols / 8]
        rows, cols = columns.shape
        return _pack_int32(columns.reshape(rows, cols // 8, 8)[:, :, _AWQ_ORDER])
    return {"qweight": pack(codes.T), "qzeros": pack(zeros.T), "scales": scales.T.astype(np.float16)}


def gptq_tensors(codes: np.ndarray, zeros: np.ndarray, scales: np.ndarray, g_idx: np.ndarray) -> dict[str, np.ndarray]:
    """AutoGPTQ (v1 checkpoint format: zeros stored minus one) from codes [out, in], zeros/scales [out, groups]
    and each input's group."""
    out_features, in_features = codes.shape
    qweight = _pack_int32(codes.T.reshape(in_features // 8, 8, out_features).transpose(0, 2, 1))
    qzeros = _pack_int32((zeros.T - 1).reshape(zeros.shape[1], out_features // 8, 8))
    return {"qweight": qweight, "qzeros": qzeros, "scales": scales.T.astype(np.float16),
            "g_idx": g_idx.astype(np.int32)}


def compressed_tensors_tensors(codes: np.ndarray, zeros: np.ndarray | None, scales: np.ndarray, bits: int
                               ) -> dict[str, np.ndarray]:
    """compressed_tensors' pack-quantized layout: unsigned codes, 32 / bits consecutive inputs per int32,
    zero points (asymmetric only) packed the same way along the outputs."""
    per_int = 32 // bits

    def pack(values: np.ndarray) -> np.ndarray:   # [rows, cols] -> [rows, cols / per_int]
        rows, cols = values.shape
        grouped = values.reshape(rows, cols // per_int, per_int).astype(np.uint64)
        words = sum(grouped[..., k] << np.uint64(bits * k) for k in range(per_int))
        return words.astype(np.uint32).view(np.int32)

    tensors = {"weight_packed": pack(codes), "weight_scale": scales.astype(np.float16),
               "weight_shape": np.array(codes.shape, dtype=np.int32)}
    if zeros is not None:
        tensors["weight_zero_point"] = pack(zeros.T).T
    return tensors


def _group_of_inputs(module: str, in_features: int, group_size: int, act_order: bool,
                     orders: dict[str, np.ndarray], rng: np.random.Generator) -> np.ndarray:
    """g_idx: in order, or (act-order) groups of inputs in a random order shared by the projections that
    read the same input (q/k/v, gate/up), as GPTQ's order comes from that input's statistics."""
    if not act_order:
        return np.arange(in_features) // group_size
    reader = module.rsplit(".", 1)[0] + (".attn_in" if module.endswith(("q_proj", "k_proj", "v_proj"))
                                         else ".mlp_in" if module.endswith(("gate_proj", "up_proj")) else module)
    order = orders.setdefault(reader, rng.permutation(in_features))
    g_idx = np.empty(in_features, dtype=np.int64)
    g_idx[order] = np.arange(in_features) // group_size
    return g_idx


def write_int4_checkpoint(float_folder: Path, folder: Path, method: str, group_size: int, seed: int = 0,
                          act_order: bool = False, bits: int = 4, symmetric: bool = True):
    """A copy of `float_folder` with every decoder projection (routed experts' included) replaced by random
    int4 weights in `method`'s layout; returns the transformers model holding the dequantized weights
    (saved as a float folder beside it and loaded back, so transformers fuses its experts itself)."""
    from safetensors.numpy import load_file, save_file
    from transformers import AutoModelForCausalLM

    shutil.copytree(float_folder, folder)
    dequantized_folder = folder.with_name(folder.name + "-dequantized")
    shutil.copytree(float_folder, dequantized_folder)
    (folder / "model.safetensors").unlink()
    rng = np.random.default_rng(seed)
    tensors, dequantized = {}, {}
    orders: dict[str, np.ndarray] = {}
    for name, value in sorted(load_file(float_folder / "model.safetensors").items()):
        module = name.removesuffix(".weight")
        dequantized[name] = value
        if not (name.endswith(".weight") and module.endswith(_PROJECTIONS)):
            tensors[name] = value
            continue
        out_features, in_features = value.shape
        groups = in_features // group_size
        levels = 1 << bits
        codes = rng.integers(0, levels, size=(out_features, in_features))
        # symmetric schemes put every zero mid-range (GPTQ sym=true exports, compressed-tensors' default)
        zeros = (np.full((out_features, groups), levels // 2) if symmetric and method != "awq"
                 else rng.integers(0, levels, (out_features, groups)))
        scales = rng.uniform(0.005, 0.04, size=(out_features, groups)).astype(np.float16) * (16 / levels)
        g_idx = _group_of_inputs(module, in_features, group_size, act_order, orders, rng)
        if method == "compressed-tensors":
            packed = compressed_tensors_tensors(codes, None if symmetric else zeros, scales, bits)
        else:
            packed = awq_tensors(codes, zeros, scales) if method == "awq" else gptq_tensors(codes, zeros, scales, g_idx)
        # NOTE: safetensors writes an array's memory as it lies: transposed views must be made C-ordered.
        tensors |= {f"{module}.{part}": np.ascontiguousarray(value) for part, value in packed.items()}
        weight = scales.astype(np.float32)[:, g_idx] * (codes - zeros[:, g_idx])
        dequantized[name] = weight.astype(np.float32)
    save_file(tensors, folder / "model.safetensors")
    save_file(dequantized, dequantized_folder / "model.safetensors")
    config = json.loads((folder / "config.json").read_text())
    weights = {"num_bits": bits, "type": "int", "symmetric": symmetric,
               "strategy": "channel" if group_size == _in_features_of(float_folder) else "group",
               "group_size": group_size, "actorder": None}
    config["quantization_config"] = (
        {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
         "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights, "input_activations": None}}}
        if method == "compressed-tensors" else
        {"quant_method": "awq", "bits": 4, "group_size": group_size, "zero_point": True, "version": "gemm"}
        if method == "awq" else
        {"quant_method": "gptq", "bits": 4, "group_size": group_size, "desc_act": act_order, "sym": True,
         "checkpoint_format": "gptq"})
    (folder / "config.json").write_text(json.dumps(config))
    return AutoModelForCausalLM.from_pretrained(dequantized_folder, dtype=torch.float32,
                                                attn_implementation="eager").eval()


def _in_features_of(folder: Path) -> int:
    return json.loads((folder / "config.json").read_text())["hidden_size"]


@pytest.fixture(scope="module")
def float_folder(tmp_path_factory):
    from transformers import LlamaConfig

    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2,
                         num_hidden_layers=2, max_position_embeddings=512, tie_word_embeddings=False)
    return save_tiny_checkpoint(tmp_path_factory.mktemp("float-llama"), config, seed=5, perturb_vectors=True)


@pytest.fixture(scope="module")
def float_moe_folder(tmp_path_factory):
    """Qwen3-MoE, whose AWQ/GPTQ exports quantize every expert (and leave the router float)."""
    from transformers import Qwen3MoeConfig

    config = Qwen3MoeConfig(hidden_size=128, intermediate_size=256, moe_intermediate_size=128, num_experts=8,
                            num_experts_per_tok=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                            num_hidden_layers=2, max_position_embeddings=512, tie_word_embeddings=False)
    return save_tiny_checkpoint(tmp_path_factory.mktemp("float-qwen3-moe"), config, seed=6, perturb_vectors=True)


@pytest.mark.parametrize("method, group_size, family, act_order", [
    ("awq", 128, "llama", False), ("gptq", 64, "llama", False), ("gptq", 128, "llama", False),
    ("gptq", 64, "llama", True), ("awq", 128, "qwen3_moe", False), ("gptq", 64, "qwen3_moe", True),
    ("compressed-tensors", 128, "llama", False), ("compressed-tensors-asym", 64, "llama", False),
    ("compressed-tensors-w8", 128, "llama", False)])
def test_int4_checkpoint_matches_dequantized_model(method, group_size, family, act_order, float_folder,
                                                   float_moe_folder, tmp_path):
    from transformers import AutoTokenizer

    folder = tmp_path / method
    source = float_folder if family == "llama" else float_moe_folder
    variant = dict(bits=8 if method.endswith("w8") else 4, symmetric=not method.endswith("asym"))
    method = method.removesuffix("-asym").removesuffix("-w8")
    hf_model = write_int4_checkpoint(source, folder, method, group_size, act_order=act_order, **variant)
    llm = LLM(str(folder), quantization=method, **ENGINE_ARGS)
    runner = llm.engine.runner
    projections = [m for name, m in runner.model.named_modules()
                   if isinstance(m, Linear) and ".layers." in name and not name.endswith("mlp.gate")]
    assert runner.use_cpu_kernels, "the packed path needs the CPU kernels"
    bits = variant["bits"]
    assert projections and all(p.packed is not None and p.weight is None and p.packed.bits == bits for p in projections)
    # act-order stays packed, its inputs gathered per call (so not through the fused C++ decode layer);
    # a matrix that is one group needs no order
    assert all((p.packed.input_order is not None) == (act_order and p.in_features > group_size) for p in projections)
    # Memory held: half a byte (W8: one) per weight plus a float32 scale (and offset) per 32 weights
    offset_bytes = 0 if bits == 8 and variant["symmetric"] else 4
    packed_bytes = sum(p.out_features * p.in_features * (bits / 8 + (4 + offset_bytes) / 32) for p in projections)
    float_bytes = sum(param.numel() * 4 for param in runner.model.parameters())
    assert runner.num_parameter_bytes == packed_bytes + float_bytes
    # Rounded prompt rows (packed_atol): these random 2-layer models' activations reach ~100, and their
    # prompt logprobs land up to 9e-3 off transformers' (1e-5 in float); the tokens must still match.
    check_parity(llm, hf_model, AutoTokenizer.from_pretrained(folder), atol=packed_atol(1e-3, 2e-2))
    # `pagedserve show` / Ollama's /api/show: the method as the quantization, weights counted unpacked
    details = describe(resolve_model(str(folder)))
    assert details.quantization == method.upper()
    assert details.parameter_count == sum(p.numel() for p in hf_model.parameters())


def test_quantization_flag_must_match_the_checkpoint(float_folder, tmp_path):
    folder = tmp_path / "awq"
    write_int4_checkpoint(float_folder, folder, "awq", 128)
    with pytest.raises(ValueError, match=r"--quantization gptq does not match the checkpoint .*: its "
                                         r"quantization_config says 'awq'"):
        LLM(str(folder), quantization="gptq", **ENGINE_ARGS)
    with pytest.raises(ValueError, match=r"--quantization awq does not match the checkpoint .*: it has no "
                                         r"quantization_config"):
        LLM(str(float_folder), quantization="awq", **ENGINE_ARGS)
    # vLLM's name for its faster AWQ kernel loads the same checkpoint
    llm = LLM(str(folder), quantization="awq_marlin", **ENGINE_ARGS)
    assert llm.engine.runner.model.model.layers[0].self_attn.qkv_proj.packed is not None


def test_quantization_flag_on_a_gguf_is_refused(smollm2_path):
    with pytest.raises(ValueError, match=r"--quantization gptq does not match .*\.gguf: a GGUF carries its own "
                                         r"quantization"):
        LLM(str(smollm2_path), quantization="gptq", **ENGINE_ARGS)
