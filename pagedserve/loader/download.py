"""Fetching checkpoints from a model hub, with huggingface_hub's and ModelScope's own clients.

Hugging Face is the default hub (ModelScope when `EngineConfig.use_modelscope`, i.e. --use-modelscope or
VLLM_USE_MODELSCOPE, or for a `modelscope:` name). Files land in the hub cache (`--download-dir`, else
$HF_HUB_CACHE or $HF_HOME/hub), so HF_HUB_OFFLINE=1 serves them later; HF_ENDPOINT, HF_TOKEN and
HF_HUB_OFFLINE work as huggingface_hub documents them, since it reads them itself.

Only the files asked for are fetched, one at a time with a progress report each (a bar on the terminal,
NDJSON lines for /api/pull), each checked against the hub's checksum once downloaded: the sha256 of an LFS
file, the git blob id of any other. A file that fails its check is deleted, so the next pull fetches it anew.
huggingface_hub resumes a transfer the network interrupted (it asks for the rest with a Range request).
"""
from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# What a Hugging Face-format checkpoint needs: config, tokenizer, weights, generation defaults.
# "*.json" covers config.json, generation_config.json, tokenizer*.json, vocab.json and the
# safetensors index; the rest are the other tokenizer formats transformers can read.
MODEL_FILE_PATTERNS = ("*.json", "*.safetensors", "tokenizer.model", "merges.txt", "*.tiktoken", "*.jinja")
TOKENIZER_FILE_PATTERNS = ("*.json", "tokenizer.model", "merges.txt", "*.tiktoken", "*.jinja")


@dataclass(frozen=True)
class DownloadProgress:
    """One progress report: `completed` of `total` bytes of one file (`digest` as the hub gives it)."""

    file: str
    digest: str | None        # "sha256:<hex>" for LFS files, the git blob id otherwise; None if unknown
    total: int | None
    completed: int


OnProgress = Callable[[DownloadProgress], None]


@dataclass(frozen=True)
class _HubFile:
    path: str
    size: int | None
    sha256: str | None        # LFS files
    blob_id: str | None       # git's sha1 of "blob <size>\0<content>"

    @property
    def digest(self) -> str | None:
        return f"sha256:{self.sha256}" if self.sha256 else self.blob_id


def download_repo(repo_id: str, revision: str | None = None, download_dir: str | None = None,
                  allow_patterns: Sequence[str] = MODEL_FILE_PATTERNS, use_modelscope: bool = False,
                  on_progress: OnProgress | None = None) -> Path:
    """Download the files of `repo_id` matching `allow_patterns` (or find them in the cache); return the folder."""
    hub = "ModelScope" if use_modelscope else "the Hugging Face hub"
    logger.info("fetching %s%s from %s", repo_id, f"@{revision}" if revision else "", hub)
    try:
        if use_modelscope:
            return Path(_modelscope_snapshot_function()(repo_id, revision=revision, cache_dir=download_dir,
                                                        allow_patterns=list(allow_patterns)))
        return _hf_download(repo_id, revision, download_dir, allow_patterns, on_progress)
    except ChecksumError:
        raise
    except Exception as error:  # noqa: BLE001 - the hub clients raise many unrelated error types
        raise ValueError(
            f"could not download {repo_id} from {hub}: {type(error).__name__}: {_first_line(error)} "
            "(no network? with HF_HUB_OFFLINE=1 a model pulled before loads from the cache)") from error


class ChecksumError(ValueError):
    """A downloaded file is not what the hub says it is (it was deleted)."""


def _hf_download(repo_id: str, revision: str | None, download_dir: str | None, allow_patterns: Sequence[str],
                 on_progress: OnProgress | None) -> Path:
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download
    from huggingface_hub.errors import OfflineModeIsEnabled
    from huggingface_hub.utils import filter_repo_objects

    try:
        info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    except OfflineModeIsEnabled:
        # HF_HUB_OFFLINE=1: what the cache holds for this revision, as huggingface_hub finds it.
        return Path(snapshot_download(repo_id, revision=revision, cache_dir=download_dir,
                                      allow_patterns=list(allow_patterns)))
    files = [_HubFile(s.rfilename, s.size, s.lfs.sha256 if s.lfs else None, s.blob_id) for s in info.siblings or ()]
    wanted = list(filter_repo_objects(files, allow_patterns=list(allow_patterns), key=lambda file: file.path))
    if not wanted:
        raise ValueError(f"{repo_id} has no file matching {', '.join(allow_patterns)}")
    folder: Path | None = None
    for file in wanted:
        local = Path(hf_hub_download(repo_id, file.path, revision=revision or "main", cache_dir=download_dir,
                                     tqdm_class=_progress_bar(file, on_progress)))
        _verify(local, file)
        folder = local.parents[len(Path(file.path).parts) - 1]
    assert folder is not None
    return folder


def _verify(local: Path, file: _HubFile) -> None:
    """Check a cached file against the hub's checksum, once (a checked checksum is noted in pagedserve's
    cache); delete it if it does not match."""
    from pagedserve.config.paths import pagedserve_cache_dir

    blob = local.resolve()
    expected = file.sha256 or file.blob_id
    checked = pagedserve_cache_dir() / "verified" / (expected or "none")
    if expected is None or checked.exists():
        return
    digest = _sha256(blob) if file.sha256 else _git_blob_id(blob)
    if digest != expected:
        blob.unlink(missing_ok=True)
        local.unlink(missing_ok=True)
        raise ChecksumError(f"{file.path}: checksum mismatch (expected {expected}, got {digest}); the damaged "
                            "download was deleted, pull again")
    checked.parent.mkdir(parents=True, exist_ok=True)
    checked.touch()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _git_blob_id(path: Path) -> str:
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())   # noqa: S324 - git's blob id, not security
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _progress_bar(file: _HubFile, on_progress: OnProgress | None) -> type | None:
    """huggingface_hub's bar (on the terminal) when nobody listens, else a tqdm that reports each update."""
    if on_progress is None:
        return None
    from tqdm.auto import tqdm

    report: OnProgress = on_progress

    class Reporter(tqdm):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)
            self._completed = int(kwargs.get("initial") or 0)
            report(DownloadProgress(file.path, file.digest, kwargs.get("total") or file.size, self._completed))

        def update(self, n: float | None = 1) -> bool | None:
            self._completed += int(n or 0)
            report(DownloadProgress(file.path, file.digest, self.total or file.size, self._completed))
            return super().update(n)

    return Reporter


def download_url(url: str, download_dir: str | None = None, on_progress: OnProgress | None = None) -> Path:
    """A file at an HTTP(S) URL, downloaded once with huggingface_hub's downloader (progress, retries, and a
    partial file that a later call resumes) under the cache; `#sha256=<hex>` on the URL is checked."""
    from urllib.parse import urldefrag, urlparse

    from huggingface_hub.file_download import http_get

    from pagedserve.config.paths import pagedserve_cache_dir

    address, fragment = urldefrag(url)
    expected = fragment.removeprefix("sha256=") if fragment.startswith("sha256=") else None
    name = Path(urlparse(address).path).name or "download"
    folder = Path(download_dir or pagedserve_cache_dir() / "downloads") / hashlib.sha256(address.encode()).hexdigest()[:16]
    target = folder / name
    if target.is_file():
        return target
    folder.mkdir(parents=True, exist_ok=True)
    partial = folder / (name + ".partial")
    resume_size = partial.stat().st_size if partial.exists() else 0
    file = _HubFile(name, None, expected, None)
    logger.info("fetching %s%s", address, f" (resuming at {resume_size} bytes)" if resume_size else "")
    try:
        with partial.open("ab") as handle:
            http_get(address, handle, resume_size=resume_size, displayed_filename=name,
                     tqdm_class=_progress_bar(file, on_progress))
    except Exception as error:  # noqa: BLE001 - network errors of every kind
        raise ValueError(f"could not download {address}: {type(error).__name__}: {_first_line(error)} "
                         "(the partial file is kept; the next pull resumes it)") from error
    if expected and _sha256(partial) != expected.lower():
        partial.unlink()
        raise ChecksumError(f"{address}: checksum mismatch (expected sha256 {expected}); the download was deleted")
    os.replace(partial, target)
    return target


def _modelscope_snapshot_function() -> Callable[..., str]:
    try:
        from modelscope import snapshot_download
    except ImportError as error:
        raise ValueError("downloading from ModelScope needs the modelscope package: pip install modelscope") from error
    return snapshot_download


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else "no details"
