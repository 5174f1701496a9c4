"""Model files checked when they are named: `pagedserve create` refuses a GGUF that would not load, and a
load error says what is wrong with the file (bad magic, truncated, a length or offset past the end)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pagedserve.loader.gguf import read_gguf


@pytest.fixture(scope="module")
def broken_ggufs(smollm2_path, tmp_path_factory) -> dict[str, Path]:
    """The real SmolLM2 GGUF, damaged three ways."""
    folder = tmp_path_factory.mktemp("broken")
    data = smollm2_path.read_bytes()
    damaged = {"bad-magic": b"GGFU" + data[4:], "truncated": data[:len(data) // 2], "cut-header": data[:5000]}
    paths = {}
    for name, content in damaged.items():
        paths[name] = folder / f"{name}.gguf"
        paths[name].write_bytes(content)
    return paths


@pytest.mark.parametrize("name, cause", [
    ("bad-magic", "not a valid GGUF file (it starts with b'GGFU', not the magic b'GGUF')"),
    ("truncated", "it is truncated, or a length or offset in its header is corrupt"),
    ("cut-header", "but its header needs bytes up to"),
])
def test_load_errors_name_the_cause(broken_ggufs, name, cause):
    with pytest.raises(ValueError) as error:
        read_gguf([broken_ggufs[name]])
    message = str(error.value)
    assert message.startswith(str(broken_ggufs[name])) and cause in message
    assert "reshape" not in message and "dtype" not in message


@pytest.mark.parametrize("name", ["bad-magic", "truncated"])
def test_create_refuses_a_broken_gguf(broken_ggufs, tmp_path, name):
    modelfile = tmp_path / "Modelfile"
    modelfile.write_text(f"FROM {broken_ggufs[name]}\nPARAMETER temperature 0.5\n")
    models = tmp_path / "models"
    result = subprocess.run([sys.executable, "-m", "pagedserve", "create", "broken", "-f", str(modelfile)],
                            capture_output=True, text=True, timeout=300, cwd=Path(__file__).parent.parent,
                            env={**os.environ, "PAGEDSERVE_MODELS": str(models)})
    assert result.returncode != 0
    assert str(broken_ggufs[name]) in result.stderr + result.stdout
    assert not list(models.glob("**/*broken*"))   # nothing saved
