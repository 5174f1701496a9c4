"""Loading the tokenizer (and chat template) of a model, from a Hugging Face folder or a GGUF's metadata.

A GGUF has no tokenizer.json: its vocabulary lives in the metadata. `AutoTokenizer.from_pretrained(
folder, gguf_file=...)` rebuilds it correctly but slowly (it also parses the whole file again to build
a config: 8 s for SmolLM2, 33 s for Gemma 3), so this module calls the same transformers builders
directly and caches the result; see `_gguf_tokenizer`.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from pagedserve.config.paths import pagedserve_cache_dir
from pagedserve.loader.download import TOKENIZER_FILE_PATTERNS, download_repo
from pagedserve.loader.source import MODEL_ALIASES, ModelSource, resolve_model

logger = logging.getLogger(__name__)

# Bump when the cached form changes, so old entries are rebuilt instead of misread.
_CACHE_FORMAT = 1
_BACKEND_FILE = "tokenizer.json"
_KWARGS_FILE = "tokenizer_kwargs.json"


def load_tokenizer(source: ModelSource, tokenizer: str | None = None, chat_template: str | None = None) -> Any:
    """The model's tokenizer, or the one `tokenizer` names (a folder, .gguf, alias or repo id).

    `chat_template`, if given, replaces the tokenizer's own: a path to a Jinja file, or the template itself.
    """
    tokenizer_source = source if tokenizer is None else _tokenizer_source(tokenizer)
    if tokenizer_source.kind == "gguf":
        loaded = _gguf_tokenizer(tokenizer_source.gguf_files[0])
    else:
        loaded = _hf_tokenizer(tokenizer_source.path)
    if chat_template is not None:
        loaded.chat_template = read_chat_template(chat_template)
    return loaded


def read_chat_template(template_or_path: str) -> str:
    """The Jinja template given as a file path or literally."""
    path = Path(template_or_path).expanduser()
    try:
        is_file = path.is_file()
    except OSError:  # a literal template longer than a file name can be (ENAMETOOLONG)
        is_file = False
    if is_file:
        try:
            return path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as error:
            raise ValueError(f"{path}: cannot read chat template ({error})") from error
    if "{{" in template_or_path or "{%" in template_or_path:
        return template_or_path
    raise ValueError(f"chat_template {template_or_path!r} is neither an existing file nor a Jinja template")


def _tokenizer_source(name: str) -> ModelSource:
    path = Path(name).expanduser()
    # A tokenizer-only folder has no config.json, which resolve_model would refuse.
    if path.is_dir() and ((path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()):
        return ModelSource(name=name, kind="hf", path=path.resolve())
    if path.exists() or name in MODEL_ALIASES or ":" in name or name.lower().endswith(".gguf"):
        return resolve_model(name)
    if name.count("/") == 1:  # a repo id: fetch only the tokenizer files, not the weights
        return ModelSource(name=name, kind="hf", path=download_repo(name, allow_patterns=TOKENIZER_FILE_PATTERNS))
    return resolve_model(name)  # raises the error that lists the accepted forms


def _hf_tokenizer(folder: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{folder}: cannot load a tokenizer from this folder: {error}") from error


def _gguf_tokenizer(gguf_file: Path) -> Any:
    """Build the tokenizer from the GGUF's metadata as transformers does, caching the built form.

    Cold, this costs what transformers' builders cost (1 s for SmolLM2, 7 s for Gemma 3, which has no
    merges in the file and gets them regenerated from its 262k-token vocabulary). The cache keeps the
    backend `tokenizers` JSON and the constructor's keyword arguments, and both the cold and the cached
    path construct the tokenizer from exactly those, so they cannot differ.
    """
    cache_entry = _cache_entry(gguf_file)
    if cache_entry is not None and (cache_entry / _KWARGS_FILE).is_file():
        try:
            return _construct(cache_entry)
        except Exception as error:  # noqa: BLE001 - a damaged entry is rebuilt, whatever the damage
            logger.warning("ignoring unreadable tokenizer cache %s (%s)", cache_entry, error)
    backend, kwargs = _build_from_gguf(gguf_file)
    if cache_entry is not None and _write_cache(cache_entry, backend, kwargs):
        return _construct(cache_entry)
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)


def _build_from_gguf(gguf_file: Path) -> tuple[Any, dict[str, Any]]:
    """(backend `tokenizers.Tokenizer`, constructor kwargs): what `from_pretrained(gguf_file=...)` builds."""
    from transformers.integrations.gguf.gguf_tokenizer_mapping import convert_gguf_tokenizer, get_gguf_tokenizer

    try:
        architecture, tokenizer_dict, tokenizer_config = get_gguf_tokenizer(str(gguf_file))
        backend, extra_kwargs = convert_gguf_tokenizer(architecture, tokenizer_dict)
    except (KeyError, ValueError, IndexError) as error:
        raise ValueError(f"{gguf_file}: cannot build a tokenizer from this GGUF's metadata: {error}") from error
    # NOTE: the same kwargs TokenizersBackend.__init__ merges in when given gguf_file=.
    return backend, {**tokenizer_config, **extra_kwargs}


def _construct(cache_entry: Path) -> Any:
    from transformers import PreTrainedTokenizerFast

    kwargs = json.loads((cache_entry / _KWARGS_FILE).read_text(encoding="utf-8"))
    return PreTrainedTokenizerFast(tokenizer_file=str(cache_entry / _BACKEND_FILE), **kwargs)


def _cache_entry(gguf_file: Path) -> Path | None:
    """The cache folder for this exact file and transformers version; None if the file cannot be stat'ed."""
    import transformers

    try:
        resolved = gguf_file.resolve()
        stat = resolved.stat()
    except OSError:
        return None
    identity = f"{resolved}|{stat.st_size}|{stat.st_mtime_ns}|{transformers.__version__}|{_CACHE_FORMAT}"
    digest = hashlib.sha256(identity.encode()).hexdigest()[:16]
    return pagedserve_cache_dir() / "tokenizers" / f"{resolved.stem}-{digest}"


def _write_cache(cache_entry: Path, backend: Any, kwargs: dict[str, Any]) -> bool:
    """Write the entry atomically (a temp folder renamed into place); False if it could not be written."""
    try:
        kwargs_json = json.dumps(kwargs, ensure_ascii=False)
    except TypeError:  # a kwarg that JSON cannot hold: build without caching
        return False
    try:
        cache_entry.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".building-", dir=cache_entry.parent))
        backend.save(str(staging / _BACKEND_FILE))
        (staging / _KWARGS_FILE).write_text(kwargs_json, encoding="utf-8")
        try:
            os.replace(staging, cache_entry)
        except OSError:  # another process finished the same entry first; theirs is as good
            shutil.rmtree(staging, ignore_errors=True)
        return (cache_entry / _KWARGS_FILE).is_file()
    except OSError as error:
        logger.warning("cannot cache the tokenizer under %s (%s); it will be rebuilt next time", cache_entry, error)
        return False
