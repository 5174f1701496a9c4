"""Writing a tiny MoE Hugging Face model as llama.cpp's converter does: experts stacked into one
[num_experts, out, in] tensor per projection (ffn_gate_exps / ffn_up_exps / ffn_down_exps), quantized
with the gguf package's own quantizer."""
from __future__ import annotations

import re
from pathlib import Path

import gguf
import numpy as np
import torch

from tests.tiny_gguf import _add_tokenizer, add_model_metadata, llama_cpp_permute

Q4_0, Q8_0 = gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.Q8_0
# transformers holds each layer's experts stacked: gate_up_proj [experts, 2 * inter, hidden], down_proj.
_EXPERTS = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")
_LAYER = {  # HF module (after model.layers.N.) -> llama.cpp leaf
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "mlp.gate": "ffn_gate_inp",
    "mlp.shared_expert_gate": "ffn_gate_inp_shexp", "mlp.shared_expert.gate_proj": "ffn_gate_shexp",
    "mlp.shared_expert.up_proj": "ffn_up_shexp", "mlp.shared_expert.down_proj": "ffn_down_shexp",
}
_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def quant_type(gguf_name: str) -> gguf.GGMLQuantizationType:
    """Q8_0 for the down projections (as Q4_K_M keeps them at higher precision), Q4_0 elsewhere."""
    return Q8_0 if "ffn_down" in gguf_name else Q4_0


def round_trip_to_quantized(model) -> None:
    """Replace every matrix of `model` by what its GGUF blocks dequantize to, so the float reference and
    the GGUF hold the same weights (quantizing the result again gives the same blocks: checked)."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() < 2 or param.shape[-1] % 32 or name.endswith("mlp.gate.weight") or "shared_expert_gate" in name:
                continue
            kind = quant_type("ffn_down" if "down" in name else "")
            blocks = gguf.quants.quantize(param.numpy(), kind)
            values = gguf.quants.dequantize(blocks, kind)
            assert (gguf.quants.quantize(values, kind) == blocks).all()
            param.copy_(torch.from_numpy(values))


def write_moe_gguf(path: Path, model, architecture: str, tokenizer) -> Path:
    """`model` (Mixtral as `llama`, Qwen2-MoE as `qwen2moe`, Qwen3-MoE as `qwen3moe`) as one quantized GGUF.
    Router and shared-expert gate stay float32, as llama.cpp's quantizer leaves them."""
    config = model.config
    writer = gguf.GGUFWriter(path, architecture)
    add_model_metadata(writer, config, "qwen3" if architecture == "qwen3moe" else architecture)
    num_experts = getattr(config, "num_local_experts", None) or config.num_experts
    writer.add_expert_count(num_experts)
    writer.add_expert_used_count(config.num_experts_per_tok)
    if architecture != "llama":
        writer.add_expert_feed_forward_length(config.moe_intermediate_size)
    if architecture == "qwen2moe":
        writer.add_expert_shared_feed_forward_length(config.shared_expert_intermediate_size)
    _add_tokenizer(writer, tokenizer)
    for name, tensor in model.state_dict().items():
        array = tensor.numpy().astype(np.float32)
        if match := _EXPERTS.fullmatch(name):
            if match[2] == "down_proj":
                _add(writer, f"blk.{match[1]}.ffn_down_exps.weight", array)
            else:
                gate, up = np.split(array, 2, axis=1)
                _add(writer, f"blk.{match[1]}.ffn_gate_exps.weight", np.ascontiguousarray(gate))
                _add(writer, f"blk.{match[1]}.ffn_up_exps.weight", np.ascontiguousarray(up))
            continue
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        module, kind = name.rsplit(".", 1)
        if module in _GLOBAL:
            gguf_name = f"{_GLOBAL[module]}.{kind}"
        else:
            layer, leaf = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", module).groups()
            gguf_name = f"blk.{layer}.{_LAYER[leaf]}.{kind}"
        if architecture == "llama" and module.endswith(("q_proj", "k_proj")):
            heads = config.num_attention_heads if module.endswith("q_proj") else config.num_key_value_heads
            array = llama_cpp_permute(array, heads)
        _add(writer, gguf_name, array)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add(writer: gguf.GGUFWriter, name: str, array: np.ndarray) -> None:
    if array.ndim >= 2 and "ffn_gate_inp" not in name:
        kind = quant_type(name)
        writer.add_tensor(name, gguf.quants.quantize(array, kind), raw_dtype=kind)
    else:
        writer.add_tensor(name, array)
