"""GGUF checkpoints (llama.cpp's format): the header, a transformers config, and float32 weights under HF names.

Parsing and dequantization are the gguf package's (`GGUFReader`, `gguf.quants.dequantize`).
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType

from pagedserve.layers.quant import PackedWeight
from pagedserve.loader import gguf_deepseek
from pagedserve.loader.gguf_blocks import can_pack, pack_blocks


@dataclass(frozen=True)
class GGUFTensorInfo:
    """Where one tensor's bytes are, and how they are encoded."""

    name: str                         # GGUF name, e.g. blk.0.attn_q.weight
    shape: tuple[int, ...]            # torch order: [out_features, in_features] for a matrix
    ggml_type: GGMLQuantizationType
    file: Path
    offset: int                       # absolute byte offset of the data in `file`
    num_bytes: int


@dataclass(frozen=True)
class GGUFCheckpoint:
    """The metadata (from the first part) and the tensors (from every part) of a possibly split GGUF."""

    files: tuple[Path, ...]
    metadata: dict[str, Any] = field(repr=False)   # plain Python values; arrays are lists
    tensors: tuple[GGUFTensorInfo, ...] = field(repr=False)

    @property
    def architecture(self) -> str:
        return self.metadata["general.architecture"]

    @property
    def tensor_names(self) -> frozenset[str]:
        return frozenset(info.name for info in self.tensors)


class _Reader(gguf.GGUFReader):
    """GGUFReader over a plain ndarray view of its memory map.

    NOTE: numpy.memmap runs Python code on every slice, and the reader slices once per element of
    every metadata array; the plain view makes reading a 262k-token vocabulary about 5x faster.
    """

    @property  # type: ignore[override]   # a plain ndarray where the reader declares a memmap
    def data(self) -> np.ndarray:
        return self._data

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._data = value.view(np.ndarray)

    def _get(self, offset: int, dtype: Any, count: int = 1, override_order: Any = None) -> np.ndarray:
        # NOTE: the reader slices past the end without a word, and fails later reshaping what it got;
        # a read past the end is what a truncated file, or a corrupt length or offset, looks like.
        end = int(offset) + int(np.dtype(dtype).itemsize) * int(count)
        if end > len(self._data):
            raise _PastTheEnd(end, len(self._data))
        return super()._get(offset, dtype, count, override_order)


class _PastTheEnd(ValueError):
    def __init__(self, end: int, size: int) -> None:
        super().__init__(f"the file has {size} bytes but its header needs bytes up to {end}: it is truncated, or "
                         "a length or offset in its header is corrupt")


_GGUF_MAGIC = b"GGUF"


def read_gguf(files: Sequence[Path]) -> GGUFCheckpoint:
    """Parse the headers of all parts of a GGUF (tensor data is left on disk until iter_gguf_weights)."""
    if not files:
        raise ValueError("read_gguf needs at least one .gguf file")
    paths = tuple(Path(path) for path in files)
    headers = [_read_header(path) for path in paths]
    metadata = headers[0][0]
    # NOTE: only the first part of a split GGUF carries the model's metadata; the others hold split.* keys.
    if not isinstance(metadata.get("general.architecture"), str):
        raise ValueError(f"{paths[0]}: not a valid GGUF file (no general.architecture in its metadata)")
    tensors = tuple(info for _, infos in headers for info in infos)
    _check_split(paths, [part_metadata for part_metadata, _ in headers], len(tensors))
    names = [info.name for info in tensors]
    if len(set(names)) != len(names):
        duplicate = next(name for name in names if names.count(name) > 1)
        raise ValueError(f"{paths[0]}: tensor {duplicate!r} appears more than once across the GGUF parts")
    return GGUFCheckpoint(files=paths, metadata=metadata, tensors=tensors)


def _read_header(path: Path) -> tuple[dict[str, Any], list[GGUFTensorInfo]]:
    if not path.is_file():
        raise ValueError(f"{path}: no such GGUF file")
    file_size = path.stat().st_size
    if file_size == 0:
        raise ValueError(f"{path}: not a valid GGUF file (the file is empty)")
    try:
        with path.open("rb") as file:
            magic = file.read(len(_GGUF_MAGIC))
        if magic != _GGUF_MAGIC:
            raise ValueError(f"{path}: not a valid GGUF file (it starts with {magic!r}, not the magic {_GGUF_MAGIC!r})")
        reader = _Reader(path)
        metadata = {key: field_.contents() for key, field_ in reader.fields.items()}
    except OSError as error:
        raise ValueError(f"{path}: cannot read GGUF file ({error.strerror or error})") from None
    except _PastTheEnd as error:
        raise ValueError(f"{path}: not a valid GGUF file ({error})") from None
    except ValueError as error:
        if str(error).startswith(str(path)):
            raise
        raise ValueError(f"{path}: not a valid GGUF file ({error})") from None
    except Exception as error:   # the reader fails with whatever numpy or struct raise on a bad header
        raise ValueError(f"{path}: not a valid GGUF file ({type(error).__name__}: {error})") from None
    infos = []
    for tensor in reader.tensors:
        end = tensor.data_offset + int(tensor.n_bytes)
        if end > file_size:
            raise ValueError(f"{path}: not a valid GGUF file (tensor {tensor.name!r} ends at byte {end} but the "
                             f"file has {file_size} bytes; is it truncated?)")
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))   # ggml lists dimensions fastest-first
        infos.append(GGUFTensorInfo(tensor.name, shape, GGMLQuantizationType(tensor.tensor_type), path,
                                    int(tensor.data_offset), int(tensor.n_bytes)))
    return metadata, infos


def _check_split(paths: tuple[Path, ...], metadatas: list[dict[str, Any]], num_tensors: int) -> None:
    """Parts must be the whole split, in order: llama.cpp's gguf-split numbers them in `split.no`."""
    keys = gguf.Keys.Split
    num_parts = metadatas[0].get(keys.LLM_KV_SPLIT_COUNT, 1)
    if num_parts != len(paths):
        raise ValueError(f"{paths[0]}: the GGUF says it has {num_parts} part(s) but {len(paths)} file(s) were given")
    for index, (path, metadata) in enumerate(zip(paths, metadatas)):
        if metadata.get(keys.LLM_KV_SPLIT_NO, 0) != index:
            raise ValueError(f"{path}: expected split part number {index}, the file says "
                             f"{metadata.get(keys.LLM_KV_SPLIT_NO)}")
    expected_tensors = metadatas[0].get(keys.LLM_KV_SPLIT_TENSORS_COUNT, num_tensors)
    if expected_tensors != num_tensors:
        raise ValueError(f"{paths[0]}: the split GGUF should hold {expected_tensors} tensors, "
                         f"its parts hold {num_tensors}")


# llama.cpp architecture -> (transformers model_type, model class)
_HF_ARCHITECTURES = {
    "llama": ("llama", "LlamaForCausalLM"),
    "mistral": ("mistral", "MistralForCausalLM"),
    "qwen2": ("qwen2", "Qwen2ForCausalLM"),
    "qwen3": ("qwen3", "Qwen3ForCausalLM"),
    "gemma3": ("gemma3_text", "Gemma3ForCausalLM"),
    "qwen2moe": ("qwen2_moe", "Qwen2MoeForCausalLM"),
    "qwen3moe": ("qwen3_moe", "Qwen3MoeForCausalLM"),
    "deepseek2": ("deepseek_v3", "DeepseekV3ForCausalLM"),   # or V2: see _hf_architecture
}
# llama.cpp writes Mixtral as `llama` with experts (llama.expert_count).
_MIXTRAL = ("mixtral", "MixtralForCausalLM")
# llama.cpp's converter interleaves the rotary halves of each Q/K head for these; iter_gguf_weights undoes it.
_PERMUTED_QK_ARCHITECTURES = ("llama", "mistral")
# Gemma's RMSNorm scales by (1 + w); llama.cpp stores 1 + w, transformers stores w.
_OFFSET_NORM_ARCHITECTURES = ("gemma3",)
_REQUIRED = object()


def gguf_hf_config(ckpt: GGUFCheckpoint) -> Any:
    """The transformers `PretrainedConfig` the GGUF's metadata describes."""
    from transformers import AutoConfig

    model_type, model_class = _hf_architecture(ckpt)
    kwargs = _common_config(ckpt) | {"architectures": [model_class]}
    if ckpt.architecture == "gemma3":
        kwargs |= _gemma3_config(ckpt, kwargs)
    elif ckpt.architecture == "mistral":
        # MistralConfig defaults to a 4096 window; only a window the file states applies.
        kwargs["sliding_window"] = _metadata(ckpt, "attention.sliding_window", None)
    if ckpt.architecture == "deepseek2":
        kwargs |= gguf_deepseek.deepseek_config(ckpt.metadata, ckpt.tensor_names, kwargs)
    elif _metadata(ckpt, "expert_count", 0):
        kwargs |= _moe_config(ckpt, model_type)
    try:
        return AutoConfig.for_model(model_type, **kwargs)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{ckpt.files[0]}: its metadata does not make a valid {model_type} config: {error}") from error


def _hf_architecture(ckpt: GGUFCheckpoint) -> tuple[str, str]:
    if ckpt.architecture == "llama" and _metadata(ckpt, "expert_count", 0):
        return _MIXTRAL
    if ckpt.architecture == "deepseek2":
        if gguf_deepseek.is_v3(ckpt.metadata, ckpt.tensor_names):
            return "deepseek_v3", "DeepseekV3ForCausalLM"
        return "deepseek_v2", "DeepseekV2ForCausalLM"
    if ckpt.architecture not in _HF_ARCHITECTURES:
        raise ValueError(f"{ckpt.files[0]}: GGUF architecture {ckpt.architecture!r} is not supported "
                         f"(supported: {', '.join(sorted(_HF_ARCHITECTURES))})")
    return _HF_ARCHITECTURES[ckpt.architecture]


def _metadata(ckpt: GGUFCheckpoint, key: str, default: Any = _REQUIRED) -> Any:
    """`<architecture>.<key>` from the metadata; a per-layer list must hold one value for every layer."""
    full_key = f"{ckpt.architecture}.{key}"
    value = ckpt.metadata.get(full_key, default)
    if value is _REQUIRED:
        raise ValueError(f"{ckpt.files[0]}: GGUF metadata has no {full_key}")
    if isinstance(value, list) and key != "attention.sliding_window_pattern":
        if len(set(value)) != 1:
            raise ValueError(f"{ckpt.files[0]}: per-layer {full_key} values {value[:8]}... are not supported")
        value = value[0]
    return value


def _common_config(ckpt: GGUFCheckpoint) -> dict[str, Any]:
    metadata, names = ckpt.metadata, ckpt.tensor_names
    hidden_size = _metadata(ckpt, "embedding_length")
    num_heads = _metadata(ckpt, "attention.head_count")
    head_dim = (_metadata(ckpt, "attention.key_length", None) or _metadata(ckpt, "rope.dimension_count", None)
                or hidden_size // num_heads)
    config = {
        "vocab_size": _vocab_size(ckpt),
        "hidden_size": hidden_size,
        "intermediate_size": _metadata(ckpt, "feed_forward_length"),
        "num_hidden_layers": _metadata(ckpt, "block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": _metadata(ckpt, "attention.head_count_kv", num_heads),
        "head_dim": head_dim,
        "rms_norm_eps": _metadata(ckpt, "attention.layer_norm_rms_epsilon"),
        "max_position_embeddings": _metadata(ckpt, "context_length"),
        # llama.cpp writes the output projection only when it differs from the embedding
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "bos_token_id": metadata.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": _eos_token_ids(metadata),
        "pad_token_id": metadata.get("tokenizer.ggml.padding_token_id"),
    }
    # Absent values stay absent so each config class keeps its own default (Gemma 3's theta is 1e6).
    if (rope_theta := _metadata(ckpt, "rope.freq_base", None)) is not None:
        config["rope_theta"] = float(rope_theta)
    if (rope_scaling := _rope_scaling(ckpt, config.get("rope_theta", 10000.0), head_dim)) is not None:
        config["rope_scaling"] = rope_scaling
    if (dtype := _float_dtype(ckpt)) is not None:
        config["dtype"] = dtype
    return config


def _vocab_size(ckpt: GGUFCheckpoint) -> int:
    if (vocab_size := _metadata(ckpt, "vocab_size", None)) is not None:
        return vocab_size
    if embedding := next((info for info in ckpt.tensors if info.name == "token_embd.weight"), None):
        return embedding.shape[0]
    return len(ckpt.metadata.get("tokenizer.ggml.tokens", ()))


def _eos_token_ids(metadata: dict[str, Any]) -> int | list[int] | None:
    # End-of-turn and end-of-message tokens stop generation too when the file names them.
    ids = [metadata[key] for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                     "tokenizer.ggml.eom_token_id") if key in metadata]
    unique_ids = list(dict.fromkeys(ids))
    return unique_ids[0] if len(unique_ids) == 1 else (unique_ids or None)


def _float_dtype(ckpt: GGUFCheckpoint) -> str | None:
    """The float type of the matrices, or None for a quantized file (norms are F32 in every file)."""
    matrix_types = {info.ggml_type for info in ckpt.tensors if len(info.shape) > 1}
    names = {GGMLQuantizationType.F32: "float32", GGMLQuantizationType.F16: "float16",
             GGMLQuantizationType.BF16: "bfloat16"}
    return names.get(matrix_types.pop()) if len(matrix_types) == 1 else None


def _rope_scaling(ckpt: GGUFCheckpoint, rope_theta: float, head_dim: int) -> dict[str, Any] | None:
    kind = _metadata(ckpt, "rope.scaling.type", None)
    if kind is None and (linear_scale := _metadata(ckpt, "rope.scale_linear", None)) is not None:
        kind, factor = "linear", linear_scale
    else:
        factor = _metadata(ckpt, "rope.scaling.factor", 1.0)
    if kind in (None, "none"):
        return _llama3_rope_scaling(ckpt, rope_theta, head_dim) if "rope_freqs.weight" in ckpt.tensor_names else None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": float(factor),
                   "original_max_position_embeddings": _metadata(ckpt, "rope.scaling.original_context_length")}
        for gguf_key, hf_key in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if (value := _metadata(ckpt, f"rope.scaling.{gguf_key}", None)) is not None:
                scaling[hf_key] = float(value)
        return scaling
    raise ValueError(f"{ckpt.files[0]}: rope scaling type {kind!r} is not supported (linear, yarn)")


def _llama3_rope_scaling(ckpt: GGUFCheckpoint, rope_theta: float, head_dim: int) -> dict[str, Any] | None:
    """Recover Llama 3's rope scaling from the per-frequency factors llama.cpp stores as `rope_freqs`.

    The file keeps only the factors, so the parameters every Llama 3.x release uses are assumed and
    checked against them; a file they do not reproduce is refused rather than run with wrong positions.
    """
    stored = _dequantized(next(info for info in ckpt.tensors if info.name == "rope_freqs.weight"))
    scaling = {"rope_type": "llama3", "factor": float(stored.max()), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    if scaling["factor"] == 1.0:
        return None
    if stored.shape != (head_dim // 2,) or not np.allclose(_llama3_rope_factors(scaling, rope_theta, head_dim),
                                                            stored, rtol=1e-4):
        raise ValueError(f"{ckpt.files[0]}: its rope_freqs tensor is not Llama 3 rope scaling with factor "
                         f"{scaling['factor']}, low/high frequency factors 1/4 and original context 8192")
    return scaling


def _llama3_rope_factors(scaling: dict[str, Any], rope_theta: float, head_dim: int) -> np.ndarray:
    """The divisor of each rotary frequency under Llama 3 scaling, as llama.cpp's converter computes it."""
    inverse_frequencies = 1.0 / rope_theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelengths = 2 * math.pi / inverse_frequencies
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    smooth = (original / wavelengths - low) / (high - low)
    blended = 1.0 / ((1 - smooth) / factor + smooth)
    return np.where(wavelengths < original / high, 1.0, np.where(wavelengths > original / low, factor, blended))


def _gemma3_config(ckpt: GGUFCheckpoint, common: dict[str, Any]) -> dict[str, Any]:
    num_layers, head_dim = common["num_hidden_layers"], common["head_dim"]
    # llama.cpp scales queries by 1/sqrt(head_dim), except for the 62-layer 27B: 1/sqrt(hidden / heads).
    scalar = common["hidden_size"] // common["num_attention_heads"] if num_layers == 62 else head_dim
    config = {
        "query_pre_attn_scalar": scalar,
        "sliding_window": _metadata(ckpt, "attention.sliding_window", None),
        "rope_local_base_freq": 10000.0,   # llama.cpp hard-codes the sliding layers' theta too
        "final_logit_softcapping": _metadata(ckpt, "final_logit_softcapping", None),
        "attn_logit_softcapping": _metadata(ckpt, "attn_logit_softcapping", None),
    }
    pattern = _metadata(ckpt, "attention.sliding_window_pattern", 6)  # every 6th layer is global
    if isinstance(pattern, list):  # newer files: one flag per layer, true where the layer slides
        config["layer_types"] = ["sliding_attention" if slides else "full_attention" for slides in pattern]
    else:
        config["sliding_window_pattern"] = pattern
    return config


def _moe_config(ckpt: GGUFCheckpoint, model_type: str) -> dict[str, Any]:
    """Routing from the expert_* keys, under the names each transformers config uses."""
    num_experts, top_k = _metadata(ckpt, "expert_count"), _metadata(ckpt, "expert_used_count")
    if model_type == "mixtral":
        return {"num_local_experts": num_experts, "num_experts_per_tok": top_k}
    # A layer without a router (ffn_gate_inp) has a dense MLP.
    dense_layers = [layer for layer in range(_metadata(ckpt, "block_count"))
                    if f"blk.{layer}.ffn_gate_inp.weight" not in ckpt.tensor_names]
    config = {"num_experts": num_experts, "num_experts_per_tok": top_k,
              "moe_intermediate_size": _metadata(ckpt, "expert_feed_forward_length"),
              "decoder_sparse_step": 1, "mlp_only_layers": dense_layers}
    if model_type == "qwen2_moe":
        # llama.cpp's qwen2moe never renormalises the chosen experts' weights; its qwen3moe always does.
        config |= {"shared_expert_intermediate_size": _metadata(ckpt, "expert_shared_feed_forward_length"),
                   "norm_topk_prob": False}
    else:
        config["norm_topk_prob"] = True
    return config


_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER_TENSORS = {  # leaf of blk.N.<leaf> -> module of model.layers.N.<module>
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
# Gemma 3 norms both sides of attention and of the MLP; its ffn_norm is the one before the MLP.
_GEMMA3_LAYER_TENSORS = _LAYER_TENSORS | {
    "post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_MOE_LAYER_TENSORS = _LAYER_TENSORS | {
    "ffn_gate_inp": "mlp.gate", "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj", "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
}
_MIXTRAL_LAYER_TENSORS = _LAYER_TENSORS | {"ffn_gate_inp": "block_sparse_moe.gate"}
# Stacked experts, [num_experts, out, in] in one tensor: yielded one expert at a time.
_EXPERT_TENSORS = {"ffn_gate_exps": "gate_proj", "ffn_up_exps": "up_proj", "ffn_down_exps": "down_proj"}
_MIXTRAL_EXPERT_TENSORS = {"ffn_gate_exps": "w1", "ffn_up_exps": "w3", "ffn_down_exps": "w2"}
_CONFIG_ONLY_TENSORS = frozenset({"rope_freqs.weight"})  # folded into rope_scaling by gguf_hf_config
_DEQUANTIZE_CHUNK_ELEMENTS = 1 << 18
_LAYER_TENSOR_NAME = re.compile(r"blk\.(?P<layer>\d+)\.(?P<leaf>\w+)\.(?P<kind>weight|bias)")


def num_gguf_tensors(ckpt: GGUFCheckpoint) -> int:
    """How many tensors iter_gguf_weights yields (for a progress bar)."""
    return sum(info.shape[0] if _is_stacked_experts(info) else 1
               for info in ckpt.tensors if info.name not in _CONFIG_ONLY_TENSORS)


def _is_stacked_experts(info: GGUFTensorInfo) -> bool:
    return len(info.shape) == 3 and info.name.split(".")[-2] in _EXPERT_TENSORS


def iter_gguf_weights(ckpt: GGUFCheckpoint, hf_config: Any, packed: bool = False
                      ) -> Iterator[tuple[str, torch.Tensor | PackedWeight]]:
    """Yield (HF parameter name, weight in HF layout) for every tensor, one at a time.

    Weights are float32 tensors, except that with `packed` the matrices of the quantized formats
    PackedWeight can hold exactly are yielded as PackedWeight instead of being dequantized.
    """
    model_type, _ = _hf_architecture(ckpt)
    architecture = ckpt.architecture
    layer_tensors = {"gemma3_text": _GEMMA3_LAYER_TENSORS, "mixtral": _MIXTRAL_LAYER_TENSORS,
                     "qwen2_moe": _MOE_LAYER_TENSORS, "qwen3_moe": _MOE_LAYER_TENSORS,
                     "deepseek_v2": gguf_deepseek.LAYER_TENSORS,
                     "deepseek_v3": gguf_deepseek.LAYER_TENSORS}.get(model_type, _LAYER_TENSORS)
    split_kv_b: dict[str, dict[str, np.ndarray]] = {}   # layer -> the halves of a split attn_kv_b seen so far
    for info in ckpt.tensors:
        if info.name in _CONFIG_ONLY_TENSORS:
            continue
        if _is_stacked_experts(info):
            yield from _expert_weights(info, model_type, packed)
            continue
        if (match := _LAYER_TENSOR_NAME.fullmatch(info.name)) and match["leaf"] in gguf_deepseek.SPLIT_KV_B:
            if f"blk.{match['layer']}.attn_kv_b.weight" in ckpt.tensor_names:
                continue   # the file keeps kv_b whole too
            halves = split_kv_b.setdefault(match["layer"], {})
            halves[match["leaf"]] = _dequantized(info)
            if len(halves) == 2:
                kv_b = gguf_deepseek.join_kv_b(halves["attn_k_b"], halves["attn_v_b"])
                yield f"model.layers.{match['layer']}.self_attn.kv_b_proj.weight", torch.from_numpy(kv_b)
            continue
        leaf, hf_name = _hf_tensor_name(info.name, layer_tensors)
        if hf_name is None:
            raise ValueError(f"{info.file}: tensor {info.name!r} has no counterpart in a {architecture} model")
        weight = _matrix_or_vector(info, _raw_rows(info), packed)
        if architecture in _PERMUTED_QK_ARCHITECTURES and leaf in ("attn_q", "attn_k"):
            num_heads = hf_config.num_attention_heads if leaf == "attn_q" else hf_config.num_key_value_heads
            order = _unpermuted_row_order(info.shape[0], num_heads)
            weight = weight.rows(torch.from_numpy(order)) if isinstance(weight, PackedWeight) else weight[order]
        if architecture in _OFFSET_NORM_ARCHITECTURES and leaf.endswith("norm") and isinstance(weight, np.ndarray):
            weight -= 1.0
        if leaf == "ffn_gate_inp_shexp" and isinstance(weight, np.ndarray) and weight.ndim == 1:
            weight = weight[None, :]   # llama.cpp may store the shared expert's [1, hidden] gate as [hidden]
        yield hf_name, weight if isinstance(weight, PackedWeight) else torch.from_numpy(weight)


def _matrix_or_vector(info: GGUFTensorInfo, rows: np.ndarray, packed: bool) -> np.ndarray | PackedWeight:
    """`rows` (raw bytes of some of `info`'s rows) as a PackedWeight where possible, else float32."""
    row_length = info.shape[-1] if info.shape else 1
    if packed and len(info.shape) >= 2 and can_pack(info.ggml_type):
        return pack_blocks(rows, info.ggml_type, row_length)
    values = _dequantized_rows(info, rows)            # [num_rows, row_length]
    return values.reshape(info.shape) if rows.shape[0] * row_length == math.prod(info.shape) else values


def _expert_weights(info: GGUFTensorInfo, model_type: str, packed: bool
                    ) -> Iterator[tuple[str, torch.Tensor | PackedWeight]]:
    """A stacked [num_experts, out, in] expert tensor as each expert's own matrix, still packed."""
    match = _LAYER_TENSOR_NAME.fullmatch(info.name)
    assert match is not None, "stacked expert tensors are layer tensors"
    if model_type == "mixtral":
        prefix, projection = "block_sparse_moe", _MIXTRAL_EXPERT_TENSORS[match["leaf"]]
    else:
        prefix, projection = "mlp", _EXPERT_TENSORS[match["leaf"]]
    num_experts, num_rows = info.shape[0], info.shape[1]
    rows = _raw_rows(info)                            # [num_experts * out, bytes_per_row]
    for expert in range(num_experts):
        weight = _matrix_or_vector(info, rows[expert * num_rows:(expert + 1) * num_rows], packed)
        name = f"model.layers.{match['layer']}.{prefix}.experts.{expert}.{projection}.{match['kind']}"
        yield name, weight if isinstance(weight, PackedWeight) else torch.from_numpy(weight)


def _hf_tensor_name(gguf_name: str, layer_tensors: dict[str, str]) -> tuple[str, str | None]:
    """(GGUF leaf name, HF parameter name or None if unknown)."""
    base, _, kind = gguf_name.rpartition(".")
    if base in _GLOBAL_TENSORS and kind in ("weight", "bias"):
        return base, f"{_GLOBAL_TENSORS[base]}.{kind}"
    match = _LAYER_TENSOR_NAME.fullmatch(gguf_name)
    if match is not None and match["leaf"] in gguf_deepseek.BIAS_TENSORS and layer_tensors is gguf_deepseek.LAYER_TENSORS:
        return match["leaf"], f"model.layers.{match['layer']}.{gguf_deepseek.BIAS_TENSORS[match['leaf']]}"
    if match is None or match["leaf"] not in layer_tensors:
        return base, None
    return match["leaf"], f"model.layers.{match['layer']}.{layer_tensors[match['leaf']]}.{match['kind']}"


def _raw_rows(info: GGUFTensorInfo) -> np.ndarray:
    """The tensor's bytes as [num_rows, bytes_per_row] (a plain ndarray view of the file)."""
    raw = np.memmap(info.file, dtype=np.uint8, mode="r", offset=info.offset, shape=(info.num_bytes,))
    row_length = info.shape[-1] if info.shape else 1
    return raw.view(np.ndarray).reshape(math.prod(info.shape) // row_length, -1)


def _dequantized(info: GGUFTensorInfo) -> np.ndarray:
    """The tensor as a fresh float32 array of `info.shape`."""
    return _dequantized_rows(info, _raw_rows(info)).reshape(info.shape)


def _dequantized_rows(info: GGUFTensorInfo, rows: np.ndarray) -> np.ndarray:
    """Raw rows of `info` as a fresh float32 [num_rows, row_length] array."""
    row_length = info.shape[-1] if info.shape else 1
    values = np.empty((rows.shape[0], row_length), dtype=np.float32)
    # NOTE: gguf.quants.dequantize is ~5x faster on cache-sized pieces than on a whole 262k-row embedding.
    rows_per_chunk = max(1, _DEQUANTIZE_CHUNK_ELEMENTS // row_length)
    try:
        for start in range(0, rows.shape[0], rows_per_chunk):
            chunk = slice(start, start + rows_per_chunk)
            values[chunk] = gguf.quants.dequantize(rows[chunk], info.ggml_type)
    except NotImplementedError:
        raise ValueError(f"{info.file}: tensor {info.name!r} is {info.ggml_type.name}, "
                         "which the gguf package cannot dequantize") from None
    return values


def _unpermuted_row_order(num_rows: int, num_heads: int) -> np.ndarray:
    """Row order that undoes llama.cpp's Q/K permutation.

    llama.cpp stores each head's rows as interleaved pairs (x0, x_half, x1, x_half+1, ...); HF keeps halves.
    """
    head_half = num_rows // num_heads // 2
    return np.arange(num_rows).reshape(num_heads, head_half, 2).swapaxes(1, 2).reshape(-1)
