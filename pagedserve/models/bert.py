"""The BERT family of encoders (BERT, MiniLM, RoBERTa / XLM-R): embedding models, never generators.

Every token attends to every other token of its own prompt (no causal mask), so a prompt runs whole in
one step and keeps no KV cache: attention reads only this step's K/V, split by the prefill chunks of the
forward context. Follows transformers' modeling_bert.py (post-norm layers, exact erf GELU); RoBERTa
differs only in counting positions from padding_idx + 1. Token types are all 0, as for the single texts
an embedding request sends.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagedserve.config import ModelConfig
from pagedserve.layers.forward_context import get_forward_context
from pagedserve.layers.linear import Linear, VocabEmbedding
from pagedserve.layers.norm import LayerNorm


class BertEmbeddings(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.position_offset = config.position_offset
        self.word_embeddings = VocabEmbedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = VocabEmbedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = VocabEmbedding(max(config.type_vocab_size, 1), config.hidden_size)
        self.LayerNorm = LayerNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        token_types = torch.zeros_like(input_ids)
        hidden_states = (self.word_embeddings(input_ids) + self.position_embeddings(positions + self.position_offset)
                         + self.token_type_embeddings(token_types))          # [num_tokens, hidden_size]
        return self.LayerNorm(hidden_states)


class BertSelfAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        size = self.num_heads * self.head_dim
        self.qkv_proj = Linear(config.hidden_size, 3 * size, bias=True, shard_sizes={"q": size, "k": size, "v": size})

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        num_tokens = hidden_states.shape[0]
        # [num_tokens, num_heads, head_dim] each
        q, k, v = self.qkv_proj(hidden_states).view(num_tokens, 3, self.num_heads, self.head_dim).unbind(1)
        meta = get_forward_context().attn_metadata
        # A one-token prompt (batched with the decodes) attends only to itself: its output is its value.
        out = v.clone()
        # NOTE: the scheduler never splits an encoder's prompt, so each chunk is a whole prompt.
        assert all(chunk.start == 0 for chunk in meta.prefills), "an encoder prompt was split into chunks"
        if meta.prefills:
            # All prompts of the step in one call, padded to the longest: a call per prompt cost a parallel
            # region each, which dominated steps of many short texts.
            batch_rows, valid = meta.padded_prefills()
            padded = [x.new_zeros(*valid.shape, self.num_heads, self.head_dim) for x in (q, k, v)]
            for dest, x in zip(padded, (q, k, v)):
                dest[valid] = x[batch_rows]
            # keys past a prompt's end are masked; queries there are padding and never read back
            pq, pk, pv = (x.transpose(1, 2) for x in padded)
            attended = F.scaled_dot_product_attention(pq, pk, pv, attn_mask=valid[:, None, None, :])
            out[batch_rows] = attended.transpose(1, 2)[valid]
        return out.reshape(num_tokens, self.num_heads * self.head_dim)


class BertOutput(nn.Module):
    """dense, then LayerNorm of (that + the block's input): the post-norm residual BERT uses twice."""

    def __init__(self, in_features: int, config: ModelConfig) -> None:
        super().__init__()
        self.dense = Linear(in_features, config.hidden_size, bias=True)
        self.LayerNorm = LayerNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, hidden_states: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(hidden_states) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertOutput(config.hidden_size, config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(hidden_states), hidden_states)


class BertIntermediate(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        if config.hidden_act != "gelu":
            raise ValueError(f"BERT with activation {config.hidden_act!r} is not supported (only gelu)")
        self.dense = Linear(config.hidden_size, config.intermediate_size, bias=True)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.dense(hidden_states))


class BertLayer(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertOutput(config.intermediate_size, config)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        attended = self.attention(hidden_states)
        return self.output(self.intermediate(attended), attended)


class BertEncoder(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            hidden_states = layer(hidden_states)
        return hidden_states


class BertModel(nn.Module):
    """The encoder stack; `forward` gives the last hidden states the pooler reads."""

    packed_modules = {"query": ("qkv_proj", "q"), "key": ("qkv_proj", "k"), "value": ("qkv_proj", "v")}
    # Checkpoints saved from a task model (BertForMaskedLM, ...) put the encoder under bert. / roberta.
    checkpoint_prefixes = {"bert.": "", "roberta.": ""}
    # The position-id buffer, BertModel's pooler (sentence-transformers pools the hidden states itself)
    # and task heads carry nothing an embedding uses.
    ignored_checkpoint_prefixes = ("embeddings.position_ids", "bert.embeddings.position_ids",
                                   "roberta.embeddings.position_ids", "pooler.", "bert.pooler.", "roberta.pooler.",
                                   "cls.", "lm_head.")

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """[num_tokens] ids and positions -> [num_tokens, hidden_size] last hidden states."""
        return self.encoder(self.embeddings(input_ids, positions))
