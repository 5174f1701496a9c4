"""Finding a model's files and reading them: weights as (name, tensor) pairs, its config, its tokenizer.

Formats never reach the models: each loader yields Hugging Face parameter names and tensors in HF
layout, whatever the file stored (safetensors as is; GGUF blocks kept packed or dequantized, and
un-permuted). Import the submodules (`loader.source`, `loader.gguf`, ...) directly: this package
imports nothing, so the server can read a chat template without loading torch.
"""
