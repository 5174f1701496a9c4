"""A sentence-transformers model folder's pooling: modules.json, the Pooling module's config.json,
sentence_bert_config.json, and Matryoshka support from config.json."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pagedserve.config.pooler import PoolerConfig

_MODULES_FILE = "modules.json"
_MODULE_PREFIX = "sentence_transformers.models."
# Modules that change nothing here: the transformer itself (we run it) and Normalize (read below).
_PASSIVE_MODULES = ("Transformer", "Normalize")
# 1_Pooling/config.json's switches -> our pooling type; the others (max, mean_sqrt_len, weightedmean)
# are refused rather than silently replaced by another pooling.
_POOLING_MODES = {"pooling_mode_mean_tokens": "MEAN", "pooling_mode_cls_token": "CLS",
                  "pooling_mode_lasttoken": "LAST"}


def pooler_config(folder: Path | None, hf_config: Any, is_causal: bool) -> PoolerConfig:
    """How to pool this checkpoint if it is served for embeddings: its sentence-transformers config,
    else vLLM's defaults (CLS for a BERT-family encoder, LAST for a decoder; normalized)."""
    found = read_pooler_config(folder, hf_config)
    if found is not None:
        return found
    return PoolerConfig("LAST" if is_causal else "CLS", True, **matryoshka_settings(hf_config))


def read_pooler_config(folder: Path | None, hf_config: Any) -> PoolerConfig | None:
    """The folder's sentence-transformers pooling, or None when it has no modules.json. Raises
    ValueError for modules we do not run (Dense projections, max pooling, ...), naming them."""
    if folder is None or not (Path(folder) / _MODULES_FILE).is_file():
        return None
    folder = Path(folder)
    modules = _read_json(folder / _MODULES_FILE)
    if not isinstance(modules, list):
        raise ValueError(f"{folder / _MODULES_FILE}: expected a list of modules")
    pooling_type, normalize = None, False
    for module in modules:
        kind = str(module.get("type", "")).removeprefix(_MODULE_PREFIX)
        if kind == "Pooling":
            pooling_type = _pooling_type(folder / str(module.get("path", "")) / "config.json")
        elif kind == "Normalize":
            normalize = True
        elif kind not in _PASSIVE_MODULES:
            raise ValueError(f"{folder / _MODULES_FILE}: the sentence-transformers module {kind!r} is not supported "
                             "(only Transformer, Pooling and Normalize)")
    if pooling_type is None:
        raise ValueError(f"{folder / _MODULES_FILE}: has no Pooling module")
    bert_config = folder / "sentence_bert_config.json"
    settings = _read_json(bert_config) if bert_config.is_file() else {}
    max_seq_length = settings.get("max_seq_length")
    return PoolerConfig(pooling_type, normalize,
                        max_seq_length=int(max_seq_length) if max_seq_length else None,
                        do_lower_case=bool(settings.get("do_lower_case", False)),
                        **matryoshka_settings(hf_config))


def matryoshka_settings(hf_config: Any) -> dict[str, Any]:
    """config.json's `is_matryoshka` / `matryoshka_dimensions`, as vLLM reads them."""
    dimensions = getattr(hf_config, "matryoshka_dimensions", None)
    is_matryoshka = bool(getattr(hf_config, "is_matryoshka", False) or dimensions)
    return {"is_matryoshka": is_matryoshka,
            "matryoshka_dimensions": tuple(int(d) for d in dimensions) if dimensions else None}


def _pooling_type(config_file: Path) -> str:
    if not config_file.is_file():
        raise ValueError(f"{config_file}: missing; the Pooling module needs its config")
    settings = _read_json(config_file)
    chosen = [mode for mode, on in settings.items() if mode.startswith("pooling_mode_") and on]
    if len(chosen) != 1 or chosen[0] not in _POOLING_MODES:
        raise ValueError(f"{config_file}: pooling {', '.join(chosen) or 'none'} is not supported "
                         f"(one of {', '.join(_POOLING_MODES)})")
    return _POOLING_MODES[chosen[0]]


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error})") from error
