"""Writing a tiny Hugging Face model (and its byte-level BPE tokenizer) as GGUF, as llama.cpp's converter does."""
from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np


def llama_cpp_permute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute: interleave each head's rotary halves."""
    return (weights.reshape(num_heads, 2, weights.shape[0] // num_heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def write_tiny_gguf(path: Path, model, architecture: str, tokenizer,
                    ggml_type: gguf.GGMLQuantizationType = gguf.GGMLQuantizationType.F32) -> Path:
    """One GGUF of `model` (llama or gemma3) with `tokenizer` in its metadata: float32, or with every
    matrix quantized to `ggml_type` (vectors stay float32, as llama.cpp's quantizer leaves them)."""
    config = model.config
    writer = gguf.GGUFWriter(path, architecture)
    add_model_metadata(writer, config, architecture)
    _add_tokenizer(writer, tokenizer)
    add_tensors(writer, gguf_tensors(model, architecture), ggml_type)
    return finish(writer, path)


def add_tensors(writer: gguf.GGUFWriter, tensors: dict[str, np.ndarray], ggml_type: gguf.GGMLQuantizationType) -> None:
    """Matrices quantized to `ggml_type` (unless F32), vectors float32, as llama.cpp's quantizer leaves them."""
    for name, array in tensors.items():
        if ggml_type != gguf.GGMLQuantizationType.F32 and array.ndim == 2:
            writer.add_tensor(name, gguf.quants.quantize(array, ggml_type), raw_dtype=ggml_type)
        else:
            writer.add_tensor(name, array)


def finish(writer: gguf.GGUFWriter, path: Path) -> Path:
    """Write what `writer` holds (header, metadata, tensors) to `path` and close it."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def gguf_tensors(model, architecture: str) -> dict[str, np.ndarray]:
    """`model`'s weights under llama.cpp's tensor names, float32, transformed as its converter does."""
    config = model.config
    model_arch = next(arch for arch, name in gguf.MODEL_ARCH_NAMES.items() if name == architecture)
    name_map = gguf.get_tensor_name_map(model_arch, config.num_hidden_layers)
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        module, kind = name.rsplit(".", 1)
        array = tensor.numpy().astype(np.float32)
        if architecture == "llama" and module.endswith(("q_proj", "k_proj")):
            heads = config.num_attention_heads if module.endswith("q_proj") else config.num_key_value_heads
            array = llama_cpp_permute(array, heads)
        if architecture == "gemma3" and module.endswith("norm"):
            array = array + 1  # llama.cpp stores Gemma's (1 + w) norm scale
        tensors[f"{name_map.get_name(module)}.{kind}"] = array
    return tensors


def add_model_metadata(writer: gguf.GGUFWriter, config, architecture: str) -> None:
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    if architecture != "gemma3":
        writer.add_rope_freq_base(config.rope_parameters["rope_theta"])
        if architecture == "qwen3":   # head_dim is not hidden_size / heads: llama.cpp writes key/value lengths
            writer.add_key_length(head_dim)
            writer.add_value_length(head_dim)
        else:
            writer.add_rope_dimension_count(head_dim)
        return
    rope = config.rope_parameters["full_attention"]
    writer.add_rope_freq_base(rope["rope_theta"])
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_sliding_window(config.sliding_window)
    writer.add_sliding_window_pattern([kind == "sliding_attention" for kind in config.layer_types])
    if config.attn_logit_softcapping is not None:
        writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    if config.final_logit_softcapping is not None:
        writer.add_final_logit_softcapping(config.final_logit_softcapping)


def _add_tokenizer(writer: gguf.GGUFWriter, tokenizer) -> None:
    """A byte-level BPE vocabulary as llama.cpp writes one ("gpt2"): tokens by id, merges, special ids."""
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[token] for token in tokens] == list(range(len(tokens))), "token ids must be dense"
    special = set(tokenizer.all_special_tokens)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if token in special else gguf.TokenType.NORMAL
                            for token in tokens])
    writer.add_token_merges([merge if isinstance(merge, str) else " ".join(merge) for merge in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(False)
