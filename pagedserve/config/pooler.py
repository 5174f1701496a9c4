"""How a pooling model turns a prompt's hidden states into one vector: `PoolerConfig`."""
from __future__ import annotations

from dataclasses import dataclass

POOLING_TYPES = ("MEAN", "CLS", "LAST")


@dataclass(frozen=True)
class PoolerConfig:
    """What the checkpoint's sentence-transformers config (modules.json, 1_Pooling/config.json,
    sentence_bert_config.json) says, or vLLM's defaults for a decoder converted to embeddings (LAST,
    normalized)."""

    pooling_type: str                 # MEAN: average of the prompt's tokens, CLS: the first, LAST: the last
    normalize: bool                   # L2-normalize the vector (sentence-transformers' Normalize module)
    max_seq_length: int | None = None   # sentence_bert_config.json: longer inputs were never trained on
    do_lower_case: bool = False
    # Matryoshka: whether a request may truncate the vector with `dimensions`, and to which sizes
    # (None: any size up to the full one).
    is_matryoshka: bool = False
    matryoshka_dimensions: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.pooling_type not in POOLING_TYPES:
            raise ValueError(f"pooling type must be one of {', '.join(POOLING_TYPES)}, got {self.pooling_type!r}")

    @property
    def needs_whole_prompt(self) -> bool:
        """MEAN and CLS read every prompt row at once, so such prompts are never split into chunks."""
        return self.pooling_type != "LAST"


def resolve_pooler_config(runner: str, convert: str, is_causal: bool, architecture: str,
                          checkpoint_pooler: PoolerConfig) -> PoolerConfig | None:
    """The pooler the engine runs, or None to generate. `runner` is EngineConfig.runner_choice;
    `checkpoint_pooler` what the checkpoint's sentence-transformers config (or the default) says."""
    if runner == "pooling" and is_causal and convert == "none":
        raise ValueError(f"{architecture} generates text; pooling it needs --convert embed (or auto), not none")
    if runner == "generate" and not is_causal:
        raise ValueError(f"{architecture} is an encoder (an embedding model): it cannot generate text; serve it "
                         "with --runner pooling (or auto)")
    if runner == "pooling" or (runner == "auto" and not is_causal):
        return checkpoint_pooler
    return None
