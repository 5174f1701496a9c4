"""The layer rules and the type check hold (pyproject's [tool.importlinter] and [tool.mypy]), so no change can
quietly re-create an import circle or an upward import."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def run(tool: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / tool)], cwd=cwd, capture_output=True, text=True, timeout=600)


def test_import_contracts_hold():
    result = run("lint-imports", ROOT)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_an_upward_import_breaks_a_contract(tmp_path):
    """The check can fail: the scheduler importing the server (and, through it, torch) is caught."""
    shutil.copytree(ROOT / "pagedserve", tmp_path / "pagedserve", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    scheduler = tmp_path / "pagedserve" / "engine" / "scheduler.py"
    scheduler.write_text(scheduler.read_text() + "\nfrom pagedserve.server import errors  # noqa: E402\n"
                         "import torch  # noqa: E402\n")
    result = run("lint-imports", tmp_path)
    assert result.returncode != 0
    assert "pagedserve.engine.scheduler -> pagedserve.server.errors" in result.stdout
    assert "pagedserve.engine.scheduler -> torch" in result.stdout



def test_the_core_type_checks():
    result = run("mypy", ROOT)
    assert result.returncode == 0, result.stdout[-5000:]


def test_no_unused_imports_or_undefined_names():
    result = subprocess.run([str(BIN / "ruff"), "check", "--select", "F,E9", "pagedserve", "tests", "bench"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-5000:]
