"""Build (once, cached) and load the C++ CPU kernels: `torch.ops.pagedserve.*` and `torch.classes.pagedserve.*`.

The sources in csrc/ (one pair per kernel family, one registration.cpp) are compiled for one
instruction-set variant (kernels/isa.py: `avx512`, `avx2`, or `native` elsewhere), chosen at run time
from the CPU's flags or $PAGEDSERVE_CPU_ISA. Each variant has its own cache directory in pagedserve's
cache, keyed by every source and header, the flags and the torch version, so later starts load it in
milliseconds; only the variant this process runs is ever built. `python -m pagedserve.kernels` builds
it ahead of time (the Makefile does, so the first serve is fast). Where no compiler is available the
engine runs on plain torch ops instead.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import torch

from pagedserve.config.paths import pagedserve_cache_dir
from pagedserve.kernels.isa import ISA_ENV, IsaVariant, choose_variant, this_cpu

logger = logging.getLogger(__name__)

_SOURCE_DIR = Path(__file__).with_name("csrc")
_FLAGS = ["-O3", "-fopenmp", "-DNDEBUG"]
_loaded: IsaVariant | None = None
_tried = False


def cpu_kernels_available() -> bool:
    """Load the kernels, building them first if needed; False (logged once) when that is impossible.

    Raises ValueError when $PAGEDSERVE_CPU_ISA names a variant that is unknown or that this CPU cannot run."""
    global _loaded, _tried
    if not _tried:
        variant = choose_variant(this_cpu(), os.environ.get(ISA_ENV))
        _tried = True
        _loaded = variant if _load(variant) else None
    return _loaded is not None


def kernel_isa() -> str | None:
    """The name of the variant loaded in this process (`avx512`, `avx2`, `native`), None if none is."""
    return _loaded.name if _loaded is not None else None


def _sources() -> list[Path]:
    return sorted(_SOURCE_DIR.glob("*.cpp"))


def _build_dir(variant: IsaVariant) -> Path:
    digest = hashlib.sha256()
    # NOTE: headers too: a change to one must rebuild every source that includes it.
    for path in _sources() + sorted(_SOURCE_DIR.glob("*.h")):
        digest.update(path.name.encode())
        digest.update(path.read_bytes())
    digest.update(" ".join(_FLAGS + list(variant.compile_flags)).encode())
    digest.update(torch.__version__.encode())
    if not variant.is_x86:   # -march=native code must not be reused on a CPU with other instruction sets
        digest.update(" ".join(sorted(this_cpu().flags)).encode())
    return pagedserve_cache_dir() / "kernels" / f"{variant.name}-{digest.hexdigest()[:16]}"


def _load(variant: IsaVariant) -> bool:
    if sys.platform != "linux":
        logger.info("CPU kernels are built for Linux only; using plain torch ops")
        return False
    from torch.utils import cpp_extension

    build_dir = _build_dir(variant)
    library = build_dir / "pagedserve_cpu.so"
    try:
        if library.exists():
            torch.ops.load_library(str(library))
            logger.debug("loaded the %s CPU kernels from %s", variant.name, build_dir)
            return True
        if shutil.which("c++") is None and shutil.which("g++") is None:
            logger.warning("no C++ compiler found; using plain torch ops (slower)")
            return False
        build_dir.mkdir(parents=True, exist_ok=True)
        logger.info("Compiling CPU kernels for %s (%s; first run on this machine only, about a minute)...",
                    variant.name, variant.description)
        start = time.perf_counter()
        # NOTE: torch's extension builder looks for ninja on PATH; the venv's bin holds the pip one.
        os.environ["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
        cpp_extension.load(name="pagedserve_cpu", sources=[str(path) for path in _sources()],
                           extra_cflags=_FLAGS + list(variant.compile_flags), build_directory=str(build_dir),
                           is_python_module=False, verbose=False)
        logger.info("Compiled CPU kernels in %.0fs into %s", time.perf_counter() - start, build_dir)
        return True
    except Exception as error:   # compiler and loader failures come in many types
        logger.warning("could not build the CPU kernels (%s); using plain torch ops (slower)", error)
        return False
