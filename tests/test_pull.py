"""Downloads with the real huggingface_hub client against a loopback server speaking the Hub's HTTP API
(tests/fake_hub.py): only the files asked for, every part of a split GGUF, a cut transfer resumed, a
corrupted file caught by its checksum, and HF_ENDPOINT, HF_HUB_OFFLINE, HF_TOKEN / HUGGING_FACE_HUB_TOKEN
and HF_HOME as huggingface_hub reads them. `pagedserve pull` runs as a subprocess with the environment a
user would set; the last tests serve a hub model on first use, then again offline."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.fake_hub import FakeHub
from tests.server_process import ServerProcess

QUANTS = {f"tiny-{quant}.gguf": f"GGUF {quant} ".encode() * 5000 for quant in ("Q4_K_M", "Q4_K", "Q8_0", "F16")}
SPLIT = {f"big-Q4_K_M-{index:05d}-of-00003.gguf": f"part {index} ".encode() * 3000 for index in (1, 2, 3)}
SPLIT["big-Q8_0.gguf"] = b"q8" * 1000


@pytest.fixture
def hub():
    hub = FakeHub({"org/quants": {**QUANTS, "README.md": b"# tiny\n"}, "org/split": SPLIT}).start()
    yield hub
    hub.stop()


def environment(hub: FakeHub, home: Path, **extra: str) -> dict[str, str]:
    keep = {name: value for name, value in os.environ.items() if not name.startswith(("HF_", "HUGGING_FACE"))}
    return {**keep, "HF_ENDPOINT": hub.url, "HF_HOME": str(home), "PAGEDSERVE_CACHE_DIR": str(home / "pagedserve"),
            "HF_HUB_DISABLE_XET": "1", **extra}


def pull(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pagedserve", "pull", *args], capture_output=True, text=True,
                          timeout=120, env=env)


def cached(home: Path, repo: str, name: str) -> bytes:
    snapshots = home / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots"
    return next(snapshots.glob(f"*/{name}")).read_bytes()


def test_a_gguf_repo_with_several_quants_pulls_only_the_one_asked(hub, tmp_path):
    result = pull("org/quants:Q4_K_M", env=environment(hub, tmp_path))
    assert result.returncode == 0, result.stderr
    assert hub.downloads() == ["tiny-Q4_K_M.gguf"]            # not Q4_K, Q8_0, F16 or the README
    assert cached(tmp_path, "org/quants", "tiny-Q4_K_M.gguf") == QUANTS["tiny-Q4_K_M.gguf"]
    assert "success" in result.stdout


def test_ollama_spelling_hf_co(hub, tmp_path):
    result = pull("hf.co/org/quants:Q8_0", env=environment(hub, tmp_path))
    assert result.returncode == 0, result.stderr
    assert hub.downloads() == ["tiny-Q8_0.gguf"]


def test_a_split_gguf_pulls_all_its_parts(hub, tmp_path):
    result = pull("org/split:Q4_K_M", env=environment(hub, tmp_path))
    assert result.returncode == 0, result.stderr
    assert sorted(hub.downloads()) == [f"big-Q4_K_M-{index:05d}-of-00003.gguf" for index in (1, 2, 3)]


def test_an_interrupted_transfer_resumes(hub, tmp_path):
    """The connection drops halfway through a 24 MiB file: the client asks for the rest (huggingface_hub
    writes 10 MiB chunks, so it resumes after the first one), and the file is whole."""
    content = bytes(range(256)) * (24 * 4096)
    hub.repos["org/large"] = {"large-Q4_0.gguf": content}
    hub.cut_once.add("large-Q4_0.gguf")
    result = pull("org/large:Q4_0", env=environment(hub, tmp_path))
    assert result.returncode == 0, result.stderr
    gets = [r for r in hub.requests if r.method == "GET" and r.path.endswith("large-Q4_0.gguf")]
    assert len(gets) == 2 and "range" not in gets[0].headers
    assert gets[1].headers.get("range") == f"bytes={10 * 2**20}-"   # the rest only
    assert cached(tmp_path, "org/large", "large-Q4_0.gguf") == content


def test_a_corrupted_file_is_caught_by_its_checksum_and_not_kept(hub, tmp_path):
    hub.corrupt.add("tiny-Q4_K_M.gguf")
    env = environment(hub, tmp_path)
    result = pull("org/quants:Q4_K_M", env=env)
    assert result.returncode != 0 and "checksum mismatch" in result.stderr, result.stderr
    blobs = list((tmp_path / "hub" / "models--org--quants" / "blobs").iterdir())
    assert hashlib.sha256(QUANTS["tiny-Q4_K_M.gguf"]).hexdigest() not in {blob.name for blob in blobs} or \
        all(blob.read_bytes() == QUANTS["tiny-Q4_K_M.gguf"] for blob in blobs)
    hub.corrupt.clear()
    again = pull("org/quants:Q4_K_M", env=env)
    assert again.returncode == 0, again.stderr
    assert cached(tmp_path, "org/quants", "tiny-Q4_K_M.gguf") == QUANTS["tiny-Q4_K_M.gguf"]


def test_hf_endpoint_is_where_downloads_come_from(hub, tmp_path):
    env = environment(hub, tmp_path)
    env["HF_ENDPOINT"] = "http://127.0.0.1:9"    # nothing listens there
    result = pull("org/quants:Q4_K_M", env=env)
    assert result.returncode != 0 and hub.requests == []
    assert pull("org/quants:Q4_K_M", env=environment(hub, tmp_path)).returncode == 0 and hub.requests


def test_hf_hub_offline_uses_the_cache_only(hub, tmp_path):
    env = environment(hub, tmp_path)
    assert pull("org/quants:Q4_K_M", env=env).returncode == 0
    hub.requests.clear()
    offline = pull("org/quants:Q4_K_M", env={**env, "HF_HUB_OFFLINE": "1"})
    assert offline.returncode == 0, offline.stderr
    assert hub.requests == []
    missing = pull("org/quants:Q8_0", env={**env, "HF_HUB_OFFLINE": "1"})
    assert missing.returncode != 0 and hub.requests == []


@pytest.mark.parametrize("variable", ["HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"])
def test_hf_token_reaches_the_hub(hub, tmp_path, variable):
    hub.token = "hf_secret"
    denied = pull("org/quants:Q4_K_M", env=environment(hub, tmp_path))
    assert denied.returncode != 0
    allowed = pull("org/quants:Q4_K_M", env=environment(hub, tmp_path, **{variable: "hf_secret"}))
    assert allowed.returncode == 0, allowed.stderr
    downloads = [r for r in hub.requests if "/resolve/" in r.path or r.path.startswith("/api/models/")]
    assert downloads and all(r.headers.get("authorization") == "Bearer hf_secret" for r in downloads[-3:])


def test_hf_home_is_where_the_cache_goes(hub, tmp_path):
    home = tmp_path / "elsewhere"
    assert pull("org/quants:Q4_K_M", env=environment(hub, home)).returncode == 0
    assert (home / "hub" / "models--org--quants" / "blobs").is_dir()


def test_a_url_to_a_gguf_with_its_checksum(hub, tmp_path):
    content = QUANTS["tiny-F16.gguf"]
    url = f"{hub.url}/org/quants/resolve/main/tiny-F16.gguf"
    env = environment(hub, tmp_path)
    assert pull(f"{url}#sha256={hashlib.sha256(content).hexdigest()}", env=env).returncode == 0
    assert list((tmp_path / "pagedserve" / "downloads").glob("*/tiny-F16.gguf"))[0].read_bytes() == content
    bad = pull(f"{url.replace('F16', 'Q8_0')}#sha256={'0' * 64}", env=env)
    assert bad.returncode != 0 and "checksum mismatch" in bad.stderr


def test_serve_pulls_on_first_use_then_serves_offline(hub, tmp_path, tiny_llama_dir):
    """`serve org/tiny` downloads a Hugging Face checkpoint into the hub cache; with HF_HUB_OFFLINE=1 and
    the hub gone, the same command line serves it from there."""
    hub.repos["org/tiny"] = {path.name: path.read_bytes() for path in tiny_llama_dir.iterdir() if path.is_file()}
    env = environment(hub, tmp_path)
    with ServerProcess(["org/tiny", "--max-model-len", "256", "--kv-cache-space", "0.05"], env=env).running() as server:
        assert httpx.get(server.url("/v1/models")).json()["data"][0]["id"] == "org/tiny"
        downloaded = set(hub.downloads())
    assert "config.json" in downloaded and any(name.endswith(".safetensors") for name in downloaded)
    hub.stop()
    with ServerProcess(["org/tiny", "--max-model-len", "256", "--kv-cache-space", "0.05"],
                       env={**env, "HF_HUB_OFFLINE": "1"}).running() as server:
        answer = httpx.post(server.url("/v1/completions"), json={"model": "org/tiny", "prompt": "hi",
                                                                  "max_tokens": 2}, timeout=60)
        assert answer.status_code == 200
    hub.start()   # for the fixture's stop
