"""Fetching checkpoints from a model hub.

Hugging Face is the default hub; ModelScope is used instead when `PAGEDSERVE_USE_MODELSCOPE` (or
vLLM's `VLLM_USE_MODELSCOPE`) is true. `HF_HUB_OFFLINE`, `HF_ENDPOINT` and `HF_HUB_CACHE` work as
huggingface_hub documents them, since huggingface_hub reads them itself.
"""
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

# What a Hugging Face-format checkpoint needs: config, tokenizer, weights, generation defaults.
# "*.json" covers config.json, generation_config.json, tokenizer*.json, vocab.json and the
# safetensors index; the rest are the other tokenizer formats transformers can read.
MODEL_FILE_PATTERNS = ("*.json", "*.safetensors", "tokenizer.model", "merges.txt", "*.tiktoken", "*.jinja")
TOKENIZER_FILE_PATTERNS = ("*.json", "tokenizer.model", "merges.txt", "*.tiktoken", "*.jinja")

_TRUE_STRINGS = ("1", "true", "yes", "on")


def use_modelscope() -> bool:
    """Whether downloads go to ModelScope instead of the Hugging Face hub."""
    return any(os.environ.get(name, "").strip().lower() in _TRUE_STRINGS
               for name in ("PAGEDSERVE_USE_MODELSCOPE", "VLLM_USE_MODELSCOPE"))


def download_repo(repo_id: str, revision: str | None = None, download_dir: str | None = None,
                  allow_patterns: Sequence[str] = MODEL_FILE_PATTERNS) -> Path:
    """Download the files of `repo_id` matching `allow_patterns` (or find them in the cache); return the folder."""
    from_modelscope = use_modelscope()
    hub = "ModelScope" if from_modelscope else "the Hugging Face hub"
    snapshot = _modelscope_snapshot_function() if from_modelscope else _hf_snapshot_function()
    logger.info("fetching %s%s from %s", repo_id, f"@{revision}" if revision else "", hub)
    try:
        folder = snapshot(repo_id, revision=revision, cache_dir=download_dir, allow_patterns=list(allow_patterns))
    except Exception as error:  # noqa: BLE001 - the hub clients raise many unrelated error types
        raise ValueError(
            f"could not download {repo_id} from {hub}: {type(error).__name__}: {_first_line(error)} "
            "(no network? set HF_HUB_OFFLINE=1 and pass a local path)") from error
    return Path(folder)


def _hf_snapshot_function() -> Callable[..., str]:
    from huggingface_hub import snapshot_download

    return snapshot_download


def _modelscope_snapshot_function() -> Callable[..., str]:
    try:
        from modelscope import snapshot_download
    except ImportError as error:
        raise ValueError(
            "PAGEDSERVE_USE_MODELSCOPE is set but modelscope is not installed: pip install modelscope") from error
    return snapshot_download


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no details"
