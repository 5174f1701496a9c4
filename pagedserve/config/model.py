"""What a checkpoint dictates: `ModelConfig`, built from a transformers config whatever format the weights came in."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pagedserve.config.mla import MLAConfig, mla_config_from_hf
from pagedserve.config.moe import MoEConfig, moe_config_from_hf


def token_ids(value: int | list[int] | tuple[int, ...] | None) -> tuple[int, ...]:
    """An id-or-ids setting (eos_token_id in config.json, generation_config.json, a tokenizer) as a tuple."""
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


@dataclass(frozen=True)
class ModelConfig:
    """The architecture of a checkpoint, normalised from its transformers config."""

    architecture: str
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    rope_theta: float
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    hidden_act: str = "silu"
    # NOTE: one entry per layer; None means full attention, an int is that layer's window in tokens.
    sliding_windows: tuple[int | None, ...] = ()
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    checkpoint_dtype: str | None = None
    # Gemma-style knobs; the Llama family leaves them at their defaults.
    qk_norm: bool = False
    query_pre_attn_scalar: float | None = None
    local_rope_theta: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    moe: MoEConfig | None = None          # routing of a mixture-of-experts model; None when dense
    mla: MLAConfig | None = None          # multi-head latent attention (DeepSeek); None for K/V per head
    # Encoders (BERT family) attend both ways and are only ever pooled; they embed token types and
    # absolute positions (offset by `position_offset`: RoBERTa counts from padding_idx + 1).
    is_causal: bool = True
    type_vocab_size: int = 0
    position_offset: int = 0
    # Granite's scalings (1.0 / None elsewhere): embeddings times embedding_multiplier, each block's output
    # times residual_multiplier before the residual add, attention scaled by attention_multiplier, logits
    # divided by logits_scaling.
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None
    logits_scaling: float = 1.0
    # share of each head's dims that rotate (Phi-4-mini: 0.75); 1.0 for every family served here
    partial_rotary_factor: float = 1.0

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})")
        if len(self.sliding_windows) != self.num_hidden_layers:
            raise ValueError("sliding_windows needs one entry per layer")

    @classmethod
    def from_hf(cls, hf_config: Any) -> ModelConfig:
        """Build from a transformers `PretrainedConfig` (any supported family)."""
        # A multimodal checkpoint names its class on the outer config and its text model in text_config.
        architectures = getattr(hf_config, "architectures", None) or []
        hf_config = getattr(hf_config, "text_config", None) or hf_config
        model_type = hf_config.model_type
        architecture = architectures[0] if architectures else _default_architecture(model_type)
        num_heads = hf_config.num_attention_heads
        head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
        num_layers = hf_config.num_hidden_layers
        rope_theta, rope_scaling, local_rope_theta = _rope_settings(hf_config)
        eos_ids = token_ids(hf_config.eos_token_id)
        dtype = getattr(hf_config, "dtype", None)
        return cls(
            architecture=architecture,
            model_type=model_type,
            vocab_size=hf_config.vocab_size,
            hidden_size=hf_config.hidden_size,
            intermediate_size=_intermediate_size(hf_config),
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            num_key_value_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
            head_dim=head_dim,
            rms_norm_eps=_norm_eps(hf_config),
            max_position_embeddings=hf_config.max_position_embeddings,
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
            attention_bias=bool(getattr(hf_config, "attention_bias", None) or getattr(hf_config, "qkv_bias", None)
                                or model_type == "qwen2"),
            hidden_act=str(getattr(hf_config, "hidden_act", None) or getattr(hf_config, "hidden_activation", None)
                           or getattr(hf_config, "activation_function", None) or "silu"),
            sliding_windows=_sliding_windows(hf_config, num_layers),
            bos_token_id=hf_config.bos_token_id,
            eos_token_ids=eos_ids,
            checkpoint_dtype=str(dtype).removeprefix("torch.") if dtype is not None else None,
            qk_norm=model_type in ("qwen3", "qwen3_moe", "gemma3_text", "gemma3"),
            query_pre_attn_scalar=getattr(hf_config, "query_pre_attn_scalar", None),
            local_rope_theta=local_rope_theta,
            attn_logit_softcapping=getattr(hf_config, "attn_logit_softcapping", None),
            final_logit_softcapping=getattr(hf_config, "final_logit_softcapping", None),
            moe=moe_config_from_hf(hf_config, num_layers),
            mla=mla_config_from_hf(hf_config, rope_scaling),
            is_causal=model_type not in ENCODER_MODEL_TYPES,
            type_vocab_size=int(getattr(hf_config, "type_vocab_size", 0) or 0),
            position_offset=(hf_config.pad_token_id + 1) if model_type in ("roberta", "xlm-roberta") else 0,
            embedding_multiplier=float(getattr(hf_config, "embedding_multiplier", None) or 1.0),
            residual_multiplier=float(getattr(hf_config, "residual_multiplier", None) or 1.0),
            attention_multiplier=getattr(hf_config, "attention_multiplier", None),
            logits_scaling=float(getattr(hf_config, "logits_scaling", None) or 1.0),
            partial_rotary_factor=float((getattr(hf_config, "rope_parameters", None) or {}).get("partial_rotary_factor")
                                        or getattr(hf_config, "partial_rotary_factor", None) or 1.0),
        )

    @property
    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V one token occupies across all layers, per byte of element size."""
        if self.mla is not None:   # one latent + shared rotary key per token and layer, not K/V per head
            return self.num_hidden_layers * self.mla.cache_width
        return 2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim


# Model types whose layers attend both ways (no causal mask): served as embedding models only.
ENCODER_MODEL_TYPES = ("bert", "roberta", "xlm-roberta")

_DEFAULT_ARCHITECTURES = {
    "bert": "BertModel",
    "gpt2": "GPT2LMHeadModel",
    "phi3": "Phi3ForCausalLM",
    "granite": "GraniteForCausalLM",
    "roberta": "RobertaModel",
    "xlm-roberta": "XLMRobertaModel",
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma3_text": "Gemma3ForCausalLM",
}


def _intermediate_size(hf_config: Any) -> int:
    """The MLP width; GPT-2 calls it n_inner, and None there means 4 * hidden_size."""
    size = getattr(hf_config, "intermediate_size", None) or getattr(hf_config, "n_inner", None)
    return int(size or 4 * hf_config.hidden_size)


def _norm_eps(hf_config: Any) -> float:
    """The norms' epsilon: RMSNorm families call it rms_norm_eps, LayerNorm ones layer_norm_eps (BERT) or
    layer_norm_epsilon (GPT-2)."""
    for name in ("rms_norm_eps", "layer_norm_eps", "layer_norm_epsilon"):
        value = getattr(hf_config, name, None)
        if value is not None:
            return float(value)
    raise ValueError(f"the {hf_config.model_type} config names no norm epsilon")


def _default_architecture(model_type: str) -> str:
    return _DEFAULT_ARCHITECTURES.get(model_type, model_type)


def _rope_settings(hf_config: Any) -> tuple[float, dict[str, Any] | None, float | None]:
    """(global rope theta, scaling dict or None, local-layer rope theta or None).

    transformers 5 keeps these in `rope_parameters` (per layer type for Gemma 3); older configs in
    `rope_theta` and `rope_scaling`. Both are read so either kind of config.json works.
    """
    params = getattr(hf_config, "rope_parameters", None) or {}
    local_theta = None
    if "full_attention" in params:
        local = params.get("sliding_attention") or {}
        local_theta = local.get("rope_theta")
        local_type = local.get("rope_type") or local.get("type") or "default"
        if local_type != "default":
            raise ValueError(f"rope scaling {local_type!r} on the sliding-window layers is not supported "
                             "(only their rope_theta is)")
        params = params["full_attention"]
    theta = params.get("rope_theta") or getattr(hf_config, "rope_theta", None) or 10000.0
    local_theta = local_theta or getattr(hf_config, "rope_local_base_freq", None)
    scaling = dict(params) if params else dict(getattr(hf_config, "rope_scaling", None) or {})
    scaling.pop("rope_theta", None)
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    return float(theta), (scaling if rope_type != "default" else None), local_theta


def _sliding_windows(hf_config: Any, num_layers: int) -> tuple[int | None, ...]:
    window = getattr(hf_config, "sliding_window", None)
    if not window or getattr(hf_config, "use_sliding_window", True) is False:
        return (None,) * num_layers
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types:
        return tuple(window if kind == "sliding_attention" else None for kind in layer_types)
    return (int(window),) * num_layers
