"""What every generative model gives the model runner, and the output head the families share."""
from __future__ import annotations

import torch
from torch import nn

from pagedserve.config import ModelConfig
from pagedserve.layers.linear import VocabEmbedding


def output_head(config: ModelConfig, embed_tokens: VocabEmbedding) -> VocabEmbedding:
    """The output projection: the token embedding itself when the checkpoint ties them."""
    return embed_tokens if config.tie_word_embeddings else VocabEmbedding(config.vocab_size, config.hidden_size)


class CausalLM(nn.Module):
    """A decoder stack (`model`) and its output head. The runner calls `forward(input_ids, positions)` for
    hidden states and `compute_logits(hidden_states)` for the rows it samples; both run under the step's
    forward context."""

    # checkpoint module name -> (our fused module, shard id), for load_weights
    packed_modules: dict[str, tuple[str, str]] = {}

    def __init__(self, config: ModelConfig, model: nn.Module, embed_tokens: VocabEmbedding) -> None:
        super().__init__()
        self.config = config
        self.model = model
        self.lm_head = output_head(config, embed_tokens)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[num_tokens] ids and positions -> [num_tokens, hidden_size] final hidden states."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[num_rows, hidden_size] -> [num_rows, vocab_size] float32 logits."""
        return self.lm_head.project(hidden_states).float()

    def enable_fused_decode(self) -> None:
        """Switch decode-only steps to a fused C++ layer, where the family has one (called once the weights
        are loaded and the CPU kernels are available); families without one run as they are."""
