"""IBM Granite (3.x dense): the Llama layer with four scalings from its config (transformers'
modeling_granite.py): embeddings times embedding_multiplier, attention scaled by attention_multiplier
(not 1/sqrt(head_dim)), each attention and MLP output times residual_multiplier before its residual add,
and logits divided by logits_scaling.

The residual scaling sits inside the layer, so Granite has no fused C++ decode layer; it runs the
plain layers on every step.
"""
from __future__ import annotations

import torch

from pagedserve.config import ModelConfig
from pagedserve.layers.rotary import CosSin
from pagedserve.models.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel


class GraniteDecoderLayer(LlamaDecoderLayer):
    def __init__(self, config: ModelConfig, layer_index: int) -> None:
        super().__init__(config, layer_index)
        self.residual_multiplier = config.residual_multiplier
        if config.attention_multiplier is not None:
            self.self_attn.attn.scale = config.attention_multiplier

    def forward(self, cos_sin: CosSin, hidden_states: torch.Tensor, residual: torch.Tensor | None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            residual = hidden_states
            hidden_states = self.input_layernorm(hidden_states)
        else:
            hidden_states, residual = self.input_layernorm(hidden_states, residual)
        hidden_states = self.self_attn(cos_sin, hidden_states) * self.residual_multiplier
        hidden_states, residual = self.post_attention_layernorm(hidden_states, residual)
        return self.mlp(hidden_states) * self.residual_multiplier, residual


class GraniteModel(LlamaModel):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__(config)
        if self.embed_tokens is None or self.norm is None:
            raise ValueError("Granite runs on one pipeline stage (--pipeline-parallel-size 1)")
        self.embedding_multiplier = config.embedding_multiplier
        self.layers = torch.nn.ModuleList(GraniteDecoderLayer(config, i) for i in range(config.num_hidden_layers))

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        embed_tokens, norm = self.embed_tokens, self.norm
        assert embed_tokens is not None and norm is not None   # one stage: checked at construction
        hidden_states = embed_tokens(input_ids) * self.embedding_multiplier   # [num_tokens, hidden_size]
        cos_sin = self.rotary_emb(positions)
        residual = None
        for layer in self.layers:
            hidden_states, residual = layer(cos_sin, hidden_states, residual)
        hidden_states, _ = norm(hidden_states, residual)
        return hidden_states


class GraniteForCausalLM(LlamaForCausalLM):
    def __init__(self, config: ModelConfig) -> None:
        model = GraniteModel(config)
        super(LlamaForCausalLM, self).__init__(config, model, model.embed_tokens)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return super().compute_logits(hidden_states) / self.config.logits_scaling

    def enable_fused_decode(self) -> None:
        """None: the fused layer has no residual scaling (see the module docstring)."""
