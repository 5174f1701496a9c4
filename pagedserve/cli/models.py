"""`pagedserve create / list / show / rm / ps / run`: models made from Modelfiles, and Ollama's commands
for looking at them and at a running server.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable

from pagedserve.loader.model_info import human_bytes, human_number
from pagedserve.store.models_dir import (check_name, create_model, find_manifest, list_manifests, models_dir,
                                    remove_manifest, resolve_named_model)

DEFAULT_URL = "http://127.0.0.1:8000"


def add_model_commands(commands: argparse._SubParsersAction, add_engine_flags: Callable) -> None:
    create = commands.add_parser("create", help="create a model from a Modelfile (FROM, PARAMETER, SYSTEM, TEMPLATE)")
    create.add_argument("name", help="the new model's name")
    create.add_argument("-f", "--file", default="Modelfile", help="the Modelfile (default: ./Modelfile)")
    _add_models_dir(create)
    create.set_defaults(func=_create)

    listing = commands.add_parser("list", aliases=["ls"], help="list created models (or a server's, with --url)")
    _add_models_dir(listing)
    _add_server_flags(listing, default_url=None)
    listing.set_defaults(func=_list)

    show = commands.add_parser("show", help="show a model's architecture, parameters, context length and template")
    show.add_argument("model", help="created model, alias, .gguf file or Hugging Face folder")
    show.add_argument("--modelfile", action="store_true", help="print the Modelfile only")
    show.add_argument("--template", action="store_true", help="print the chat template only")
    _add_models_dir(show)
    show.set_defaults(func=_show)

    remove = commands.add_parser("rm", help="remove a created model (its checkpoint files stay)")
    remove.add_argument("names", nargs="+", metavar="MODEL")
    _add_models_dir(remove)
    remove.set_defaults(func=_remove)

    ps = commands.add_parser("ps", help="list the models a running server has loaded")
    _add_server_flags(ps, default_url=DEFAULT_URL)
    ps.set_defaults(func=_ps)

    run = commands.add_parser("run", help="answer one prompt and print the answer")
    run.add_argument("model_positional", metavar="MODEL", help="the model (a served name with --url)")
    run.add_argument("prompt", nargs="*", help="the prompt (default: read from stdin)")
    run.add_argument("--verbose", action="store_true", help="print timings and token rates to stderr")
    _add_server_flags(run, default_url=None)
    add_engine_flags(run)
    run.set_defaults(func=_run, log_level="WARNING")


def _add_models_dir(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models-dir", "--models_dir", dest="models_dir", default=None,
                        help="the models directory (default: $PAGEDSERVE_MODELS or ~/.local/share/pagedserve/models)")


def _add_server_flags(parser: argparse.ArgumentParser, default_url: str | None) -> None:
    where = f"(default: {default_url})" if default_url else "instead of loading the model here"
    parser.add_argument("--url", default=default_url, help=f"a running server, e.g. {DEFAULT_URL} {where}")
    parser.add_argument("--api-key", "--api_key", dest="server_api_key", metavar="KEY",
                        default=os.environ.get("PAGEDSERVE_API_KEY"),
                        help="the server's API key (default: $PAGEDSERVE_API_KEY)")


# ---- create, list, show, rm -------------------------------------------------------------------------

def _create(args: argparse.Namespace) -> int:
    check_name(args.name)
    modelfile = Path(args.file).expanduser()
    if not modelfile.is_file():
        raise ValueError(f"{modelfile}: no such Modelfile (give one with -f FILE)")
    directory = models_dir(args.models_dir)
    manifest = create_model(args.name, modelfile.read_text(encoding="utf-8"), directory, modelfile.resolve().parent)
    print(f"created {manifest.name} from {manifest.source} in {directory}")
    return 0


def _list(args: argparse.Namespace) -> int:
    if args.url is not None:
        models = _get(args, "/api/tags")["models"]
        rows = [[m["name"], m["digest"][:12], human_bytes(m["size"]), _ago(m["modified_at"])] for m in models]
        _print_table(["NAME", "ID", "SIZE", "MODIFIED"], rows)
        return 0
    rows = []
    for manifest in list_manifests(models_dir(args.models_dir)):
        size = _source_size(manifest.source)
        rows.append([manifest.name, manifest.source, human_bytes(size) if size is not None else "-",
                     _human_time(manifest.created_at)])
    _print_table(["NAME", "SOURCE", "SIZE", "MODIFIED"], rows)
    return 0


def _show(args: argparse.Namespace) -> int:
    from pagedserve.config import EngineConfig
    from pagedserve.store.modelfile import Modelfile

    manifest = find_manifest(args.model, models_dir(args.models_dir))
    config, defaults = resolve_named_model(EngineConfig(model=args.model, models_dir=args.models_dir))
    modelfile = manifest.modelfile if manifest else Modelfile(from_=config.model)
    if args.modelfile:
        print(f'# Modelfile generated by "pagedserve show"\n# To build a new Modelfile based on this, replace FROM '
              f"with:\n# FROM {args.model}\n\n{modelfile.to_text(from_=config.model)}", end="")
        return 0
    from pagedserve.loader.source import resolve_model
    from pagedserve.loader.tokenizer import read_chat_template
    from pagedserve.loader.model_info import describe

    details = describe(resolve_model(config.model))
    template = modelfile.template or (read_chat_template(config.chat_template) if config.chat_template
                                      else details.chat_template)
    if args.template:
        print(template or "")
        return 0
    context = min(filter(None, (config.max_model_len, details.context_length)), default=0)
    sections = [("Model", [["architecture", details.family], ["parameters", human_number(details.parameter_count)],
                           ["context length", str(context)], ["embedding length", str(details.embedding_length)],
                           ["quantization", details.quantization], ["format", details.format],
                           ["source", config.model]])]
    parameters = [[name, json.dumps(item)] for name, value in modelfile.parameters.items()
                  for item in (value if isinstance(value, list) else [value])]
    if parameters:
        sections.append(("Parameters", parameters))
    for title, text in (("System", defaults.system), ("Template", template), ("License", modelfile.license)):
        if text:
            sections.append((title, [[line] for line in text.splitlines()]))
    for title, rows in sections:
        print(f"  {title}")
        _print_table(None, rows, indent="    ")
        print()
    return 0


def _remove(args: argparse.Namespace) -> int:
    directory = models_dir(args.models_dir)
    for name in args.names:
        remove_manifest(name, directory)
        print(f"deleted '{name}'")
    return 0


# ---- a running server: ps, and run --url ------------------------------------------------------------

def _ps(args: argparse.Namespace) -> int:
    rows = []
    for model in _get(args, "/api/ps")["models"]:
        processor = "100% CPU" if not model.get("size_vram") else "100% GPU"
        rows.append([model["name"], model["digest"][:12], human_bytes(model["size"]), processor,
                     str(model.get("context_length", "")), _until(model["expires_at"])])
    _print_table(["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"], rows)
    return 0


def _get(args: argparse.Namespace, path: str) -> dict[str, Any]:
    import httpx

    headers = {"Authorization": f"Bearer {args.server_api_key}"} if args.server_api_key else {}
    url = args.url.rstrip("/")
    try:
        response = httpx.get(url + path, headers=headers, timeout=30)
    except httpx.HTTPError as error:
        raise ValueError(f"cannot reach the server at {url}: {error}") from None
    if response.status_code != 200:
        raise ValueError(f"{url}{path} answered {response.status_code}: {response.text.strip()}")
    return response.json()


def _run(args: argparse.Namespace) -> int:
    from pagedserve.cli.chat_backends import ChatError

    prompt = " ".join(args.prompt) if args.prompt else (sys.stdin.read() if not sys.stdin.isatty() else "")
    if not prompt.strip():
        raise ValueError("give a prompt (or pipe one in); for a conversation use `pagedserve chat MODEL`")
    try:
        return asyncio.run(_answer(args, prompt))
    except ChatError as error:
        raise ValueError(str(error)) from None


async def _answer(args: argparse.Namespace, prompt: str) -> int:
    from pagedserve.cli.chat_backends import EngineChat, ServerChat
    from pagedserve.cli.chat import timing_lines

    messages, options = [{"role": "user", "content": prompt}], {}
    if args.url is not None:
        backend = ServerChat(args.url, args.server_api_key)
        await backend.connect(args.model_positional)
    else:
        from pagedserve.cli.options import engine_config_from_options, gather_options

        backend = EngineChat(engine_config_from_options(gather_options(args)))
    try:
        async for piece in backend.stream(messages, options):
            if piece.reasoning:
                sys.stderr.write(piece.reasoning)
            sys.stdout.write(piece.text)
            sys.stdout.flush()
            if piece.timings is not None and args.verbose:
                sys.stderr.write("\n" + "\n".join(timing_lines(piece.timings)) + "\n")
    finally:
        await backend.close()
    sys.stdout.write("\n")
    return 0


# ---- printing -------------------------------------------------------------------------------------

def _print_table(header: list[str] | None, rows: list[list[str]], indent: str = "") -> None:
    table = ([header] if header else []) + rows
    if not table:
        return
    widths = [max(len(row[i]) for row in table if i < len(row)) for i in range(max(len(row) for row in table))]
    for row in table:
        cells = [cell.ljust(widths[i]) if i < len(row) - 1 else cell for i, cell in enumerate(row)]
        print(indent + "    ".join(cells).rstrip())


def _source_size(source: str) -> int | None:
    """Bytes of a model's weight files, or None when they are not on this machine yet (a hub repo)."""
    from pagedserve.loader.source import MODEL_ALIASES, resolve_model

    if source not in MODEL_ALIASES and not Path(source).exists():
        return None
    try:
        resolved = resolve_model(source)
    except ValueError:
        return None
    if resolved.kind == "gguf":
        return sum(path.stat().st_size for path in resolved.gguf_files)
    return sum(path.stat().st_size for path in resolved.path.glob("*.safetensors"))


def _human_time(unix_time: float) -> str:
    seconds = time.time() - unix_time
    for limit, unit in ((86400 * 365, "year"), (86400 * 30, "month"), (86400 * 7, "week"), (86400, "day"),
                        (3600, "hour"), (60, "minute")):
        if seconds >= limit:
            count = int(seconds // limit)
            return f"{count} {unit}{'s' if count > 1 else ''} ago"
    return "Less than a minute ago" if seconds >= 1 else "Less than a second ago"


def _parse_time(text: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def _ago(text: str) -> str:
    return _human_time(_parse_time(text))


def _until(text: str) -> str:
    """Ollama's UNTIL column: 'Forever', '4 minutes from now', 'Stopping...'."""
    seconds = _parse_time(text) - time.time()
    if seconds > 20 * 365 * 86400:
        return "Forever"
    if seconds <= 0:
        return "Stopping..."
    minutes = seconds / 60
    if minutes < 1:
        return f"{math.ceil(seconds)} seconds from now"
    return f"{round(minutes)} minutes from now" if minutes < 120 else f"{round(minutes / 60)} hours from now"
