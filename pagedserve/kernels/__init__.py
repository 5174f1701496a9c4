"""Build (once, cached) and load the C++ CPU kernels: `torch.ops.pagedserve.*` and `torch.classes.pagedserve.*`.

The sources in csrc/ (one pair per kernel family, one registration.cpp) are compiled with
-march=native for the machine they run on, into pagedserve's cache directory keyed by every source
and header, the flags, the torch version and the CPU, so later starts load them in milliseconds.
`python -m pagedserve.kernels` builds it ahead of time (the Makefile does, so the first serve is fast).
Where no compiler is available the engine runs on plain torch ops instead.
"""
from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import torch

from pagedserve.config.paths import pagedserve_cache_dir

logger = logging.getLogger(__name__)

_SOURCE_DIR = Path(__file__).with_name("csrc")
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-DNDEBUG"]
_loaded: bool | None = None


def cpu_kernels_available() -> bool:
    """Load the kernels, building them first if needed; False (logged once) when that is impossible."""
    global _loaded
    if _loaded is None:
        _loaded = _load()
    return _loaded


def _sources() -> list[Path]:
    return sorted(_SOURCE_DIR.glob("*.cpp"))


def _build_dir() -> Path:
    digest = hashlib.sha256()
    # NOTE: headers too: a change to one must rebuild every source that includes it.
    for path in _sources() + sorted(_SOURCE_DIR.glob("*.h")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    digest.update(" ".join(_FLAGS).encode())
    digest.update(torch.__version__.encode())
    digest.update(_cpu_identity().encode())
    return pagedserve_cache_dir() / "kernels" / digest.hexdigest()[:16]


def _cpu_identity() -> str:
    # -march=native code must not be reused on a CPU with other instruction sets.
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _load() -> bool:
    if sys.platform != "linux":
        logger.info("CPU kernels are built for Linux only; using plain torch ops")
        return False
    from torch.utils import cpp_extension

    build_dir = _build_dir()
    library = build_dir / "pagedserve_cpu.so"
    try:
        if library.exists():
            torch.ops.load_library(str(library))
            return True
        if shutil.which("c++") is None and shutil.which("g++") is None:
            logger.warning("no C++ compiler found; using plain torch ops (slower)")
            return False
        build_dir.mkdir(parents=True, exist_ok=True)
        logger.info("Compiling CPU kernels (first run on this machine only, about a minute)...")
        start = time.perf_counter()
        # NOTE: torch's extension builder looks for ninja on PATH; the venv's bin holds the pip one.
        os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        cpp_extension.load(name="pagedserve_cpu", sources=[str(path) for path in _sources()], extra_cflags=_FLAGS,
                           build_directory=str(build_dir), is_python_module=False, verbose=False)
        logger.info("Compiled CPU kernels in %.0fs into %s", time.perf_counter() - start, build_dir)
        return True
    except Exception as error:   # compiler and loader failures come in many types
        logger.warning("could not build the CPU kernels (%s); using plain torch ops (slower)", error)
        return False

