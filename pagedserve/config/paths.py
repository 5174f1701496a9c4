"""Where pagedserve keeps its own caches (compiled kernels, built tokenizers)."""
from __future__ import annotations

import os
from pathlib import Path


def pagedserve_cache_dir() -> Path:
    """Root of pagedserve's own caches.

    $PAGEDSERVE_CACHE_DIR if set, else $XDG_CACHE_HOME/pagedserve, else ~/.cache/pagedserve. The one
    place these variables are read.
    """
    if explicit := os.environ.get("PAGEDSERVE_CACHE_DIR"):
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "pagedserve"
