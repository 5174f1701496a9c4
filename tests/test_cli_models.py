"""`pagedserve create / list / show / run / rm` as subprocesses, with a tiny checkpoint and the models
directory in a temporary folder (by $PAGEDSERVE_MODELS, and by --models-dir)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pagedserve.cli.main import build_parser, serve_configs
from pagedserve.cli.options import gather_options, serve_model_names

# The seed-requests Modelfile's shape (a Go TEMPLATE, num_ctx, temperature), FROM a checkpoint beside it.
MODELFILE = '''FROM ./tiny
PARAMETER num_ctx 256
PARAMETER temperature 0
PARAMETER num_predict 4
PARAMETER stop "<|im_end|>"
SYSTEM You are a pirate.
TEMPLATE "<｜User｜>{{ .System }} {{ .Prompt }}<｜Assistant｜>"
'''


def pagedserve(*args: str, models_dir: Path, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PAGEDSERVE_MODELS": str(models_dir)}
    return subprocess.run([sys.executable, "-m", "pagedserve", *args], capture_output=True, text=True, env=env,
                          input=stdin, timeout=300, cwd=Path(__file__).parent.parent)


@pytest.fixture(scope="module")
def created(tmp_path_factory, tiny_llama_dir) -> Path:
    """A folder holding the checkpoint (as ./tiny), the Modelfile, and the models directory with `pirate`."""
    folder = tmp_path_factory.mktemp("modelfile")
    (folder / "tiny").symlink_to(tiny_llama_dir, target_is_directory=True)
    (folder / "Modelfile").write_text(MODELFILE)
    result = pagedserve("create", "pirate", "-f", str(folder / "Modelfile"), models_dir=folder / "models")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("created pirate from ")
    return folder


def test_create_saves_a_manifest(created, tiny_llama_dir):
    manifest = json.loads((created / "models" / "pirate.json").read_text())
    assert manifest["source"] == str(created / "tiny")
    assert manifest["modelfile"]["parameters"] == {"num_ctx": 256, "temperature": 0.0, "num_predict": 4,
                                                   "stop": ["<|im_end|>"]}
    assert "{{ System }}" in manifest["chat_template"]   # the Go template, translated to Jinja


def test_list(created):
    result = pagedserve("list", models_dir=created / "models")
    header, row = result.stdout.splitlines()
    assert header.split() == ["NAME", "SOURCE", "SIZE", "MODIFIED"]
    assert row.startswith("pirate") and str(created / "tiny") in row and "KB" in row


def test_show(created):
    shown = pagedserve("show", "pirate", models_dir=created / "models").stdout
    for expected in ("architecture        llama", "context length      256", "quantization        F32",
                     'stop           "<|im_end|>"', "You are a pirate.", "{{ .System }} {{ .Prompt }}"):
        assert expected in shown, shown
    modelfile = pagedserve("show", "pirate", "--modelfile", models_dir=created / "models").stdout
    assert f"FROM {created / 'tiny'}\n" in modelfile and "PARAMETER num_ctx 256" in modelfile


def test_run_answers_with_the_models_parameters(created):
    result = pagedserve("run", "pirate", "--verbose", "--num-kv-blocks", "32", models_dir=created / "models",
                        stdin="Hello there")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() and "eval count:           4 token(s)" in result.stderr   # PARAMETER num_predict


def test_bad_modelfile_unknown_model_and_rm(created, tmp_path):
    bad = tmp_path / "Modelfile"
    bad.write_text("FROM ./tiny\nPARAMETER temprature 0.5\n")
    refused = pagedserve("create", "typo", "-f", str(bad), models_dir=created / "models")
    assert refused.returncode == 2 and "line 2: unknown parameter 'temprature'" in refused.stderr
    other_dir = tmp_path / "other"
    plain = tmp_path / "Plain"
    plain.write_text(f"FROM {created / 'tiny'}\n")
    copied = pagedserve("create", "copy", "-f", str(plain), "--models-dir", str(other_dir),
                        models_dir=created / "models")
    assert copied.returncode == 0 and (other_dir / "copy.json").is_file()
    assert pagedserve("rm", "copy", "--models-dir", str(other_dir), models_dir=created / "models").returncode == 0
    missing = pagedserve("rm", "copy", "--models-dir", str(other_dir), models_dir=created / "models")
    assert missing.returncode == 2 and "model 'copy' not found" in missing.stderr


# ---- `serve` with several models (parsing only) ---------------------------------------------------------

def served(command_line: str) -> list[str] | None:
    return serve_model_names(gather_options(build_parser().parse_args(command_line.split())))


def test_serve_takes_several_models():
    assert served("serve A B --max-model-len 2048") == ["A", "B"]
    assert served("serve --model A --model B") == ["A", "B"]
    assert served("serve --models-dir /m") == [] and served("serve A --models-dir /m") == ["A"]
    assert served("serve") is None                                  # the default model
    engine, server = serve_configs("serve A B --lazy-load --keep-alive 10m".split(), {})
    assert engine.model == "A" and server.lazy_load and server.keep_alive == "10m"
    assert serve_configs("serve --keep-alive -1".split(), {})[1].keep_alive == "-1"
    with pytest.raises(ValueError, match="invalid duration"):
        serve_configs("serve --keep-alive soon".split(), {})
    with pytest.raises(ValueError, match="given twice"):
        served("serve A --model B")


def test_chat_in_process_uses_the_created_models_parameters(created):
    result = pagedserve("chat", "pirate", "--verbose", "--num-kv-blocks", "32", models_dir=created / "models",
                        stdin="Hello there\n/bye\n")
    assert result.returncode == 0, result.stderr
    assert "eval count:           4 token(s)" in result.stdout + result.stderr   # PARAMETER num_predict
