"""The models directory: models created from Modelfiles, each a small JSON manifest, usable by name
wherever a model is named (LLM(), serve, run, generate).

Where the directory is: `--models-dir` / `EngineConfig.models_dir`, else $PAGEDSERVE_MODELS, else
$OLLAMA_MODELS, else $XDG_DATA_HOME/pagedserve/models (~/.local/share/pagedserve/models): the default
of a library call. `serve` reads OLLAMA_MODELS at start-up into `models_dir` (config/environment.py).
A manifest records a concrete source (alias, absolute path or hub repo id): a model created FROM
another created model is flattened at creation, so resolving a name is one step.
"""
from __future__ import annotations

import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping

from pagedserve.config import EngineConfig
from pagedserve.store.go_template import is_go_template, translate_go_template
from pagedserve.store.defaults import ModelDefaults
from pagedserve.store.modelfile import Modelfile, parse_modelfile

logger = logging.getLogger(__name__)

MODELS_DIR_ENV = "PAGEDSERVE_MODELS"
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]{0,99}$")
_SPLIT_GGUF_SUFFIX = re.compile(r"-\d{5}-of-\d{5}$")
_MANIFEST_VERSION = 1
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(:[\w.-]+|/[\w./-]+\.gguf)?$")


@dataclass(frozen=True)
class ModelManifest:
    name: str
    source: str                                  # what the engine loads: alias, absolute path or repo id
    modelfile: Modelfile                          # as written (FROM, PARAMETERs, TEMPLATE, SYSTEM, ...)
    chat_template: str | None = None              # Jinja: the TEMPLATE, translated if it was a Go template
    parent: str | None = None                     # the created model it was made FROM, if any
    created_at: float = field(default_factory=time.time)

    @property
    def num_ctx(self) -> int | None:
        return self.modelfile.parameters.get("num_ctx")

    def defaults(self) -> ModelDefaults:
        file = self.modelfile
        return ModelDefaults.from_parameters(file.parameters, file.system, file.messages)

    def to_json(self) -> str:
        data = {"version": _MANIFEST_VERSION, **asdict(self)}
        data["modelfile"]["messages"] = [list(message) for message in self.modelfile.messages]
        return json.dumps(data, indent=2, ensure_ascii=False) + "\n"

    @classmethod
    def from_json(cls, text: str) -> ModelManifest:
        data = json.loads(text)
        data.pop("version", None)
        file = data.pop("modelfile")
        file["messages"] = tuple(tuple(message) for message in file.get("messages", ()))
        return cls(modelfile=Modelfile(**file), **data)


def models_dir(explicit: str | os.PathLike | None = None, environ: Mapping[str, str] = os.environ) -> Path:
    """The models directory: `explicit` if given, else from the environment (see the module docstring)."""
    if explicit:
        return Path(explicit).expanduser()
    for variable in (MODELS_DIR_ENV, "OLLAMA_MODELS"):
        if environ.get(variable):
            return Path(environ[variable]).expanduser()
    data_home = environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(data_home).expanduser() / "pagedserve" / "models"


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise ValueError(f"invalid model name {name!r}: use letters, digits, '.', '_', ':' and '-' "
                         "(at most 100 characters, starting with a letter or digit)")
    return name


def find_manifest(name: str, directory: Path) -> ModelManifest | None:
    """The manifest of a created model, also when asked for as `name:latest`; None if there is none."""
    for candidate in (name, name.removesuffix(":latest")):
        if not _NAME.match(candidate):
            continue
        path = directory / f"{candidate}.json"
        if path.is_file():
            try:
                return ModelManifest.from_json(path.read_text(encoding="utf-8"))
            except (OSError, ValueError, TypeError, KeyError) as error:
                raise ValueError(f"{path}: not a valid model manifest ({error})") from error
    return None


def list_manifests(directory: Path) -> list[ModelManifest]:
    if not directory.is_dir():
        return []
    manifests = []
    for path in sorted(directory.glob("*.json")):
        try:
            manifests.append(ModelManifest.from_json(path.read_text(encoding="utf-8")))
        except (OSError, ValueError, TypeError, KeyError) as error:
            logger.warning("%s: not a valid model manifest, skipped (%s)", path, error)
    return manifests


def save_manifest(manifest: ModelManifest, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{check_name(manifest.name)}.json"
    temporary = path.with_suffix(".json.tmp")
    temporary.write_text(manifest.to_json(), encoding="utf-8")
    temporary.replace(path)   # NOTE: atomic, so a server listing the directory never reads half a file
    return path


def remove_manifest(name: str, directory: Path) -> None:
    path = directory / f"{check_name(name)}.json"
    if not path.is_file():
        raise ValueError(f"model '{name}' not found in {directory}")
    path.unlink()


def resolve_named_model(config: EngineConfig) -> tuple[EngineConfig, ModelDefaults]:
    """The config to load a created model by its name with (its source, num_ctx and template), and its
    defaults; any other model name comes back unchanged with no defaults.

    num_ctx and --max-model-len both cap the context: the smaller wins. A --chat-template wins over TEMPLATE.
    """
    manifest = find_manifest(config.model, models_dir(config.models_dir))
    if manifest is None:
        return config, ModelDefaults()
    limits = [value for value in (config.max_model_len, manifest.num_ctx) if value]
    changed = config.replace(model=manifest.source, max_model_len=min(limits) if limits else None,
                             chat_template=config.chat_template or manifest.chat_template)
    return changed, manifest.defaults()


def default_model_name(model: str, directory: Path | None = None) -> str:
    """The name a model is served under unless told otherwise: a created model's or an alias as given,
    a file or folder's stem (without a split GGUF's part suffix), a hub repo id as given."""
    if directory is not None and find_manifest(model, directory) is not None:
        return model
    path = Path(model).expanduser()
    if path.exists():
        stem = path.name if path.is_dir() else path.stem
        return _SPLIT_GGUF_SUFFIX.sub("", stem) or stem
    return model


def create_model(name: str, modelfile_text: str, directory: Path, base_dir: Path) -> ModelManifest:
    """Parse a Modelfile and save it as model `name`. A relative FROM path is relative to `base_dir`
    (the Modelfile's folder). Raises ValueError for anything that would not load or render."""
    check_name(name)
    modelfile = parse_modelfile(modelfile_text)
    parent = find_manifest(modelfile.from_, directory)
    if parent is not None:
        source, inherited = parent.source, parent.modelfile
        modelfile = Modelfile(
            from_=modelfile.from_, parameters={**inherited.parameters, **modelfile.parameters},
            template=_first(modelfile.template, inherited.template), system=_first(modelfile.system, inherited.system),
            messages=modelfile.messages or inherited.messages, license=_first(modelfile.license, inherited.license))
    else:
        source = _source_of(modelfile.from_, base_dir)
    chat_template = parent.chat_template if parent is not None else None
    if modelfile.template is not None and (parent is None or modelfile.template != parent.modelfile.template):
        chat_template = _jinja_template(modelfile.template, source)
    manifest = ModelManifest(name=name, source=source, modelfile=modelfile, chat_template=chat_template,
                             parent=parent.name if parent is not None else None)
    save_manifest(manifest, directory)
    return manifest


def copy_model(source: str, destination: str, directory: Path, base_dir: Path) -> ModelManifest:
    """`cp SOURCE DESTINATION`: a created model's manifest under a new name, or, for any other model
    name (alias, path, hub repo id), a new model made FROM it."""
    check_name(destination)
    manifest = find_manifest(source, directory)
    if manifest is None:
        return create_model(destination, f"FROM {source}\n", directory, base_dir)
    copied = ModelManifest(name=destination, source=manifest.source, modelfile=manifest.modelfile,
                           chat_template=manifest.chat_template, parent=manifest.parent)
    save_manifest(copied, directory)
    return copied


def _first(value: str | None, fallback: str | None) -> str | None:
    return value if value is not None else fallback


def _source_of(from_: str, base_dir: Path) -> str:
    """FROM as the engine will load it: an alias or repo id as written, a path made absolute and checked."""
    from pagedserve.loader.model_info import describe
    from pagedserve.loader.source import MODEL_ALIASES, resolve_model

    if from_ in MODEL_ALIASES:
        return from_
    path = Path(from_).expanduser()
    path = path if path.is_absolute() else base_dir / path
    if path.exists():
        # NOTE: the files' headers are read now, so a corrupt or truncated file fails `create`, not the
        # first load (ValueError unless it is a readable GGUF or Hugging Face folder)
        describe(resolve_model(str(path)))
        return os.path.abspath(path)
    if _REPO_ID.match(from_):
        logger.info("FROM %s: a hub repo; it is downloaded when the model first loads", from_)
        return from_
    raise ValueError(f"FROM {from_!r}: no such file or folder (relative paths are relative to the Modelfile), "
                     f"created model or alias ({', '.join(sorted(MODEL_ALIASES))})")


def _jinja_template(template: str, source: str) -> str:
    """TEMPLATE as a Jinja chat template: translated from Ollama's Go syntax, or checked as Jinja."""
    if is_go_template(template):
        return translate_go_template(template, add_bos=_tokenizer_adds_bos(source))
    import jinja2

    try:
        jinja2.Environment().parse(template)
    except jinja2.TemplateSyntaxError as error:
        raise ValueError(f"TEMPLATE is neither a valid Jinja template nor one of Ollama's Go templates: {error}") \
            from None
    return template


def _tokenizer_adds_bos(source: str) -> bool:
    """Whether the model's tokenizer starts a prompt with BOS (llama.cpp adds it before a Go template's text)."""
    from pagedserve.loader.source import resolve_model
    from pagedserve.loader.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(resolve_model(source))
    token_ids = tokenizer.encode("a", add_special_tokens=True)
    return tokenizer.bos_token_id is not None and token_ids[:1] == [tokenizer.bos_token_id]
