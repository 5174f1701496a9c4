"""What every generative model gives the model runner, and the output head the families share."""
from __future__ import annotations

import re

import torch
from torch import nn

from pagedserve.config import ModelConfig
from pagedserve.distributed import current_model_parallel
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
    # Families built from the parallel layers (layers/parallel_linear.py) run tensor parallel; those whose
    # decoder stack builds only its pipeline stage's layers run pipeline parallel.
    supports_tensor_parallel = False
    supports_pipeline_parallel = False

    def __init__(self, config: ModelConfig, model: nn.Module, embed_tokens: VocabEmbedding | None) -> None:
        """`embed_tokens` is None on a pipeline stage after the first: the output head lives on the first
        stage, where the driver samples."""
        super().__init__()
        self.config = config
        self.model = model
        self.stage = current_model_parallel().stage
        self.lm_head = output_head(config, embed_tokens) if embed_tokens is not None else None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[num_tokens] ids and positions -> [num_tokens, hidden_size] final hidden states."""
        return self.model(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[num_rows, hidden_size] -> [num_rows, vocab_size] float32 logits."""
        assert self.lm_head is not None, "logits are computed on the first pipeline stage"
        return self.lm_head.project(hidden_states).float()

    def is_elsewhere(self, name: str) -> bool:
        """True for a checkpoint weight (our naming) that another pipeline stage holds."""
        stage = self.stage
        if stage.size == 1:
            return False
        layer = re.search(r"(?:^|\.)layers\.(\d+)\.", name)
        if layer is not None:
            return not stage.holds(int(layer.group(1)))
        if name.startswith("lm_head.") or ".embed_tokens." in name:
            return not stage.is_first
        if name.startswith("model.norm."):
            return not stage.is_last
        return False

    def enable_fused_decode(self) -> None:
        """Switch decode-only steps to a fused C++ layer, where the family has one (called once the weights
        are loaded and the CPU kernels are available); families without one run as they are."""
