"""deploy/Dockerfile, .dockerignore and the image's health check, read and run without Docker: the entrypoint is
the server on all interfaces under tini, the user is not root, the health check asks /health on the served
port, torch is the pinned CPU release, the kernels are prebuilt into the cache the runtime uses, and the
build context holds what the build copies and nothing else. `make docker-test` builds and runs the image.
"""
from __future__ import annotations

import http.server
import re
import shlex
import subprocess
import sys
import threading

import pytest

from pagedserve.cli.main import serve_configs
from pagedserve.config import ServerConfig
from tests import dockerfile
from tests.serve_command import parse_serve

HEALTHCHECK_SCRIPT = dockerfile.REPO / "deploy" / "healthcheck.py"


def test_entrypoint_is_exec_form_tini_then_the_server_on_all_interfaces():
    words = dockerfile.entrypoint()
    assert words[:4] == ["tini", "--", "pagedserve", "serve"]
    server = parse_serve(words[4:])["server"]
    assert server.host == "0.0.0.0"
    (exposed,) = dockerfile.values(dockerfile.final_stage(), "EXPOSE")
    assert int(exposed) == server.port == ServerConfig().port
    assert dockerfile.values(dockerfile.final_stage(), "CMD") == ["[]"]   # no arguments: the default model


def test_image_runs_as_a_numeric_non_root_user():
    (user,) = dockerfile.values(dockerfile.final_stage(), "USER")
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0     # numeric, so Kubernetes' runAsNonRoot can check it


def test_healthcheck_asks_health_on_the_served_port():
    (healthcheck,) = dockerfile.values(dockerfile.final_stage(), "HEALTHCHECK")
    assert "/opt/pagedserve/healthcheck.py" in healthcheck
    assert any(source.endswith("deploy/healthcheck.py /opt/pagedserve/healthcheck.py")
               for source in dockerfile.values(dockerfile.final_stage(), "COPY"))
    # One variable moves both: `serve` listens on $PAGEDSERVE_PORT and the health check asks there.
    environment = dockerfile.env(dockerfile.final_stage())
    assert "PAGEDSERVE_HEALTH_URL" not in environment and environment["PAGEDSERVE_PORT"] == "8000"
    assert serve_configs(["serve"], {"PAGEDSERVE_PORT": "9001"})[1].port == 9001


def test_torch_is_the_release_pyproject_pins():
    (pin,) = re.findall(r'"(torch==[^"]+)"', (dockerfile.REPO / "pyproject.toml").read_text())
    arguments = dict(rest.split("=", 1) for word, rest in dockerfile.instructions() if word == "ARG" and "=" in rest)
    assert pin == f"torch=={arguments['TORCH_VERSION']}"
    assert arguments["TORCH_INDEX_URL"].endswith("/whl/cpu")


def test_kernels_are_prebuilt_into_the_cache_the_runtime_uses():
    stages = dockerfile.stages()
    builder, runtime = stages["builder"], dockerfile.final_stage()
    cache_dir = dockerfile.env(builder)["PAGEDSERVE_CACHE_DIR"]
    assert dockerfile.env(runtime)["PAGEDSERVE_CACHE_DIR"] == cache_dir
    assert any(run.startswith("python -m pagedserve.kernels") for run in dockerfile.values(builder, "RUN"))
    assert f"--from=builder {cache_dir} {cache_dir}" in dockerfile.values(runtime, "COPY")
    # g++ stays in the runtime image: a CPU with other flags rebuilds the kernels at the first start.
    assert any("g++" in run for run in dockerfile.values(runtime, "RUN"))


def test_models_live_under_the_volume():
    runtime = dockerfile.final_stage()
    assert dockerfile.values(runtime, "VOLUME") == ['["/models"]']
    env = dockerfile.env(runtime)
    assert all(env[name].startswith("/models/") for name in ("PAGEDSERVE_MODELS", "HF_HOME", "MODELSCOPE_CACHE"))
    assert not env["PAGEDSERVE_CACHE_DIR"].startswith("/models")   # a mounted volume would hide the kernels


def test_build_context_holds_what_the_build_copies_and_nothing_else():
    copied = [source for rest in dockerfile.values(dockerfile.instructions(), "COPY") if "--from" not in rest
              for source in shlex.split(rest)[:-1]]
    assert copied and [source for source in copied if dockerfile.is_ignored(source)] == []
    for path in (".venv/bin/python", ".git", "tests/test_deploy.py", "pagedserve/__pycache__/app.cpython-311.pyc",
                 "deploy/k8s/base/kustomization.yaml", "model.gguf"):
        assert dockerfile.is_ignored(path), path


class _Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:   # noqa: N802 - the standard library's name
        self.send_response(200 if self.path == "/health" else 503)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def health_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    thread.join(timeout=10)


def _healthcheck(url: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HEALTHCHECK_SCRIPT)], env={"PAGEDSERVE_HEALTH_URL": url},
                          capture_output=True, text=True, timeout=30)


def test_healthcheck_script_passes_on_200_only(health_server):
    assert _healthcheck(health_server + "/health").returncode == 0
    loading = _healthcheck(health_server + "/loading")
    assert loading.returncode == 1 and "503" in loading.stderr
    with http.server.HTTPServer(("127.0.0.1", 0), _Health) as closed:
        port = closed.server_address[1]
    refused = _healthcheck(f"http://127.0.0.1:{port}/health")
    assert refused.returncode == 1 and re.search(r"refused|Errno", refused.stderr)


def test_healthcheck_asks_the_port_serve_listens_on(health_server):
    port = health_server.rsplit(":", 1)[1]
    result = subprocess.run([sys.executable, str(HEALTHCHECK_SCRIPT)], env={"PAGEDSERVE_PORT": port},
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
