"""Write a tiny-but-not-toy mixture-of-experts checkpoint with random weights, for `pagedserve bench
latency --backend pagedserve|hf` (MoE decode against transformers on the same weights).

    python bench/make_moe.py /tmp/moe-qwen3 --family qwen3_moe

transformers builds the model from its config (its own random initialisation) and writes it with
save_pretrained; the tokenizer is SmolLM2's (49,152 tokens), so the output head is as heavy as a real
small model's. Defaults: 8 experts, top-2, hidden 768, 6 layers, experts of 1,024 (~160M parameters,
~45M active per token), float32.
"""
from __future__ import annotations

import argparse
from pathlib import Path


def moe_config(family: str, vocab_size: int, hidden_size: int, num_layers: int, num_experts: int, top_k: int,
               expert_size: int):
    from transformers import MixtralConfig, Qwen3MoeConfig

    shape = dict(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_layers,
                 num_attention_heads=max(1, hidden_size // 64), num_key_value_heads=max(1, hidden_size // 256),
                 num_experts_per_tok=top_k, max_position_embeddings=4096, tie_word_embeddings=True)
    if family == "mixtral":
        return MixtralConfig(**shape, intermediate_size=expert_size, num_local_experts=num_experts)
    if family == "qwen3_moe":
        return Qwen3MoeConfig(**shape, head_dim=64, intermediate_size=4 * expert_size,
                              moe_intermediate_size=expert_size, num_experts=num_experts, norm_topk_prob=True)
    raise ValueError(f"unknown family {family!r}; choose mixtral or qwen3_moe")


def make_moe_checkpoint(folder: Path, family: str, hidden_size: int = 768, num_layers: int = 6, num_experts: int = 8,
                        top_k: int = 2, expert_size: int = 1024, seed: int = 0) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    from pagedserve.config import DEFAULT_MODEL
    from pagedserve.loader.source import resolve_model
    from pagedserve.loader.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(resolve_model(DEFAULT_MODEL))
    config = moe_config(family, len(tokenizer), hidden_size, num_layers, num_experts, top_k, expert_size)
    config.bos_token_id, config.eos_token_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    num_parameters = sum(p.numel() for p in model.parameters())
    print(f"{family}: {num_parameters / 1e6:.1f}M parameters, {num_experts} experts top-{top_k}, "
          f"hidden {hidden_size}, {num_layers} layers -> {folder}")
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", type=Path)
    parser.add_argument("--family", choices=("mixtral", "qwen3_moe"), default="qwen3_moe")
    parser.add_argument("--hidden-size", type=int, default=768)
    parser.add_argument("--num-layers", type=int, default=6)
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--expert-size", type=int, default=1024, help="each expert's intermediate size")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    make_moe_checkpoint(args.folder, args.family, args.hidden_size, args.num_layers, args.num_experts, args.top_k,
                        args.expert_size, args.seed)


if __name__ == "__main__":
    main()
