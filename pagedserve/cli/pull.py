"""`pagedserve pull / cp / stop`: Ollama's commands for fetching, copying and unloading models.

`pull` downloads a hub model (org/name, org/name:Q4_K_M, hf.co/org/name:Q4_K_M, modelscope:org/name, a
URL to a .gguf) into the hub cache with a progress bar per file, as `serve` would on first use; with
--url a running server pulls it (/api/pull) and serves it. `cp` copies a created model (or makes one
from any model name); `stop` asks a running server to unload a model now (keep_alive 0, as Ollama).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from pagedserve.cli.remote import DEFAULT_URL, add_server_flags, headers, post
from pagedserve.store.models_dir import copy_model, models_dir

def add_pull_commands(commands: argparse._SubParsersAction) -> None:
    pull = commands.add_parser("pull", help="download a model from a hub or a URL into the cache")
    pull.add_argument("model", help="org/name, org/name:Q4_K_M, org/name/file.gguf, hf.co/org/name:Q4_K_M, "
                                    "modelscope:org/name, or a URL to a .gguf file")
    pull.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    pull.add_argument("--download-dir", "--download_dir", dest="download_dir", default=None,
                      help="the hub cache to download into (default: $HF_HUB_CACHE or $HF_HOME/hub)")
    pull.add_argument("--use-modelscope", "--use_modelscope", dest="use_modelscope", action="store_true",
                      default=_true(os.environ.get("VLLM_USE_MODELSCOPE")),
                      help="download org/name from ModelScope (default: $VLLM_USE_MODELSCOPE)")
    add_server_flags(pull, default_url=None, without_url="(default: do it here)")
    pull.set_defaults(func=_pull)

    copy = commands.add_parser("cp", help="copy a model under a new name")
    copy.add_argument("source", help="created model, alias, path or hub repo id")
    copy.add_argument("destination", help="the new model's name")
    copy.add_argument("--models-dir", "--models_dir", dest="models_dir", default=None,
                      help="the models directory (default: $PAGEDSERVE_MODELS, $OLLAMA_MODELS or "
                           "~/.local/share/pagedserve/models)")
    add_server_flags(copy, default_url=None, without_url="(default: do it here)")
    copy.set_defaults(func=_copy)

    stop = commands.add_parser("stop", help="unload a model from a running server now")
    stop.add_argument("model", help="the model's served name")
    add_server_flags(stop, default_url=DEFAULT_URL)
    stop.set_defaults(func=_stop)


def _true(text: str | None) -> bool:
    return (text or "").strip().lower() in ("1", "true", "yes", "on")


def _pull(args: argparse.Namespace) -> int:
    if args.url is not None:
        return _pull_on_server(args)
    from pagedserve.loader.source import resolve_model

    source = resolve_model(args.model, args.revision, args.download_dir, args.use_modelscope)
    files = source.gguf_files or (source.path,)
    print(f"success: {args.model} -> {', '.join(str(path) for path in files)}")
    return 0


def _pull_on_server(args: argparse.Namespace) -> int:
    """Stream /api/pull's NDJSON as Ollama's CLI shows it: one line per status, progress per file."""
    import httpx

    shown = ""
    with httpx.stream("POST", args.url.rstrip("/") + "/api/pull", json={"model": args.model, "stream": True},
                      headers=headers(args), timeout=None) as response:
        if response.status_code != 200:
            raise ValueError(f"{args.url}: {response.status_code} {response.read().decode(errors='replace')}")
        for line in response.iter_lines():
            if not line:
                continue
            event = json.loads(line)
            if "error" in event:
                raise ValueError(event["error"])
            status = event.get("status", "")
            if "total" in event and event.get("total"):
                sys.stderr.write(f"\r{status} {100 * event.get('completed', 0) // event['total']:3d}%")
            elif status != shown:
                sys.stderr.write(("\n" if shown else "") + status)
            shown = status
    sys.stderr.write("\n")
    return 0


def _copy(args: argparse.Namespace) -> int:
    if args.url is not None:
        post(args, "/api/copy", {"source": args.source, "destination": args.destination})
    else:
        copy_model(args.source, args.destination, models_dir(args.models_dir), Path.cwd())
    print(f"copied '{args.source}' to '{args.destination}'")
    return 0


def _stop(args: argparse.Namespace) -> int:
    post(args, "/api/generate", {"model": args.model, "keep_alive": 0})
    return 0
