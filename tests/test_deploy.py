"""deploy/: every Kubernetes overlay renders and each object validates against the Kubernetes schemas; ports,
probes, selectors and server flags agree (tests/k8s_checks.py); the compose file validates and its services
agree with each other; the Dockerfile keeps its promises. The image itself is built and run by `make docker-test`.

Rendering uses `kustomize build` or `kubectl kustomize` where either is installed, else tests/kustomize_lite.py
(checked against kubectl where both exist). The compose file is validated against the compose-spec JSON schema
that check-jsonschema ships, and with `docker compose config` where Docker Compose v2 is installed.
"""
from __future__ import annotations

import copy
import importlib.resources
import json
import os
import shutil
import subprocess
from functools import cache
from pathlib import Path

import pytest
import yaml

from tests import compose_checks, k8s_checks, kustomize_lite
from tests.dockerfile import entrypoint
from tests.serve_command import parse_serve

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
KUSTOMIZATIONS = ("base", "overlays/single-node", "overlays/ray-cluster")
# The oldest and the newest Kubernetes release kubernetes-validate has schemas for.
K8S_VERSIONS = ("1.25.0", "latest")


def kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@cache
def _rendered(name: str) -> str:
    command = kustomize_command()
    if command is None:
        return yaml.safe_dump_all(kustomize_lite.render(DEPLOY / "k8s" / name))
    return subprocess.run([*command, str(DEPLOY / "k8s" / name)], capture_output=True, text=True, check=True,
                          timeout=120).stdout


def render(name: str) -> list[dict]:
    return [obj for obj in yaml.safe_load_all(_rendered(name)) if obj]


def by_name(objects: list[dict]) -> dict[tuple[str, str], dict]:
    return {(obj["kind"], obj["metadata"]["name"]): obj for obj in objects}


# ---- Kubernetes -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", KUSTOMIZATIONS)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_every_object_is_valid_kubernetes(name, version):
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    version = kubernetes_validate.latest_version() if version == "latest" else version
    for obj in render(name):
        kubernetes_validate.validate(obj, version, strict=True)


@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_manifests_agree_with_each_other_and_the_cli(name):
    assert k8s_checks.manifest_problems(render(name), entrypoint()) == []


@pytest.mark.skipif(kustomize_command() is None, reason="needs kustomize or kubectl to compare with")
@pytest.mark.parametrize("name", KUSTOMIZATIONS)
def test_lite_renderer_renders_what_kustomize_does(name):
    assert by_name(kustomize_lite.render(DEPLOY / "k8s" / name)) == by_name(render(name))


def test_base_serves_the_default_model_on_one_node():
    objects = by_name(render("base"))
    assert set(objects) == {("Deployment", "pagedserve"), ("Service", "pagedserve")}
    (container,) = k8s_checks.containers(objects["Deployment", "pagedserve"])
    arguments = k8s_checks.find_command(container, entrypoint(), ["pagedserve", "serve"])
    parsed = parse_serve(arguments)
    assert parsed["engine"].model == "smollm2-135m-instruct" and parsed["engine"].num_threads == 2
    assert {"startupProbe", "readinessProbe", "livenessProbe"} <= set(container)


def test_ray_cluster_is_two_nodes_running_tp2_pp2_on_ray():
    objects = by_name(render("overlays/ray-cluster"))
    head = objects["Deployment", "pagedserve"]
    workers = objects["StatefulSet", "pagedserve-ray-worker"]
    (head_container,) = k8s_checks.containers(head)
    options = parse_serve(
        k8s_checks.find_command(head_container, entrypoint(), ["pagedserve", "serve"]))["options"]
    assert (options["tensor_parallel_size"], options["pipeline_parallel_size"]) == (2, 2)
    assert options["distributed_executor_backend"] == "ray"
    assert "--head" in k8s_checks.find_command(head_container, entrypoint(), ["ray", "start"])
    nodes = int(k8s_checks.env_values(head_container)["RAY_NODES"])
    assert nodes == 1 + workers["spec"]["replicas"] == 2
    assert head["spec"]["strategy"]["type"] == "Recreate"
    images = {container["image"] for workload in (head, workers) for container in k8s_checks.containers(workload)}
    assert images == {"pagedserve:ray"}


def _broken(name: str, edit) -> list[str]:
    objects = copy.deepcopy(render(name))
    edit(by_name(objects))
    return k8s_checks.manifest_problems(objects, entrypoint())


def _first_container(objects, kind="Deployment", name="pagedserve"):
    return k8s_checks.containers(objects[kind, name])[0]


@pytest.mark.parametrize("edit, expected", [
    (lambda o: _first_container(o)["readinessProbe"]["httpGet"].update(path="/healthz"),
     "readinessProbe asks /healthz, not /health"),
    (lambda o: o["Service", "pagedserve"]["spec"]["ports"][0].update(targetPort=8080),
     "Service/pagedserve: port 8000 targets 8080"),
    (lambda o: _first_container(o)["args"].append("--port=9000"),
     "the server listens on 9000, but the port named http is 8000"),
    (lambda o: _first_container(o)["args"].append("--max-model-len=lots"), "does not parse"),
    (lambda o: o["Service", "pagedserve"]["spec"]["selector"].update({"app.kubernetes.io/component": "web"}),
     "Service/pagedserve: selects no pods"),
    (lambda o: _first_container(o).pop("livenessProbe"), "serves without a livenessProbe"),
    (lambda o: _first_container(o)["resources"].pop("limits"), "no limits cpu"),
    (lambda o: _first_container(o)["volumeMounts"][0].update(name="model"), "mounts undefined volume model"),
    (lambda o: _first_container(o)["args"].append("--num-threads=$(THREADS)"), "$(THREADS) is used but not in env"),
])
def test_checks_catch_a_broken_single_node_layout(edit, expected):
    problems = _broken("overlays/single-node", edit)
    assert any(expected in problem for problem in problems), problems


@pytest.mark.parametrize("edit, expected", [
    (lambda o: o["Service", "pagedserve-ray-head"]["spec"].pop("publishNotReadyAddresses"),
     "must publish not-ready addresses"),
    (lambda o: o["Service", "pagedserve-ray-worker"]["spec"].pop("clusterIP"), "is not headless"),
    (lambda o: o["StatefulSet", "pagedserve-ray-worker"]["spec"].update(serviceName="ray-workers"),
     "its serviceName ray-workers is not a Service here"),
    (lambda o: _first_container(o, "StatefulSet", "pagedserve-ray-worker")["env"][0].update(value="ray-head:6379"),
     "ray-head is not a Service here"),
    (lambda o: o["Service", "pagedserve-ray-head"]["spec"]["ports"][0].update(port=6380),
     "has no port 6379"),
    (lambda o: _first_container(o)["ports"][0].update(containerPort=6380),
     "does not reach the port `ray start --head` listens on"),
])
def test_checks_catch_a_broken_ray_layout(edit, expected):
    problems = _broken("overlays/ray-cluster", edit)
    assert any(expected in problem for problem in problems), problems


# ---- docker compose -------------------------------------------------------------------------------------

COMPOSE_FILE = DEPLOY / "docker-compose.yml"


def compose_file() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def nginx_conf() -> str:
    return (DEPLOY / "nginx.conf").read_text()


def compose_v2() -> list[str] | None:
    """`docker compose` (the plugin) or a docker-compose that is Compose v2, if installed."""
    for command in (["docker", "compose"], ["docker-compose"]):
        if shutil.which(command[0]) is None:
            continue
        result = subprocess.run([*command, "version", "--short"], capture_output=True, text=True, timeout=60)
        if result.returncode == 0 and result.stdout.strip().lstrip("v").startswith("2."):
            return command
    return None


def test_compose_file_matches_the_compose_spec_schema():
    jsonschema = pytest.importorskip("jsonschema")
    pytest.importorskip("check_jsonschema")
    # The compose-spec project's schema, as check-jsonschema vendors it (with its license beside it).
    schema_file = importlib.resources.files("check_jsonschema") / "builtin_schemas/vendor/compose-spec.json"
    schema = json.loads(schema_file.read_text())
    jsonschema.validate(compose_file(), schema)
    jsonschema.validate(compose_checks.interpolate(compose_file(), {}), schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**compose_file(), "services": {"pagedserve": {"helthcheck": {}}}}, schema)


@pytest.mark.skipif(compose_v2() is None, reason="Docker Compose v2 is not installed")
def test_docker_compose_config_accepts_the_file():
    result = subprocess.run([*compose_v2(), "-f", str(COMPOSE_FILE), "config", "-q"], capture_output=True,
                            text=True, timeout=120, env={**os.environ, "PAGEDSERVE_IMAGE": "pagedserve:test"})
    assert result.returncode == 0, result.stderr


def test_compose_services_agree_with_each_other_and_the_cli():
    compose = compose_checks.interpolate(compose_file(), {})
    assert compose_checks.compose_problems(compose, entrypoint(), nginx_conf()) == []


def test_compose_environment_drives_the_server():
    environ = {"MODEL_NAME": "/models/DeepSeek-R1-Q4_K_M-00001-of-00009.gguf", "SERVED_MODEL_NAME": "DeepSeek-R1",
               "MAX_MODEL_LEN": "16384", "TENSOR_PARALLEL_SIZE": "4", "NUM_THREADS": "8", "PAGEDSERVE_API_KEY": "k"}
    compose = compose_checks.interpolate(compose_file(), environ)
    server = compose["services"]["pagedserve"]
    parsed = parse_serve(compose_checks.serve_arguments(server, entrypoint()))
    engine, server_config = parsed["engine"], parsed["server"]
    assert (engine.model, engine.max_model_len, engine.tensor_parallel_size, engine.num_threads) == (
        environ["MODEL_NAME"], 16384, 4, 8)
    assert server_config.served_model_name == ("DeepSeek-R1",)
    assert compose_checks.environment(server)["PAGEDSERVE_API_KEY"] == "k"
    assert compose_checks.environment(compose["services"]["open-webui"])["OPENAI_API_KEY"] == "k"
    assert compose_checks.compose_problems(compose, entrypoint(), nginx_conf()) == []


def _compose_edit(service: str, edit):
    compose = compose_checks.interpolate(compose_file(), {})
    edit(compose["services"][service])
    return compose


@pytest.mark.parametrize("compose, conf, expected", [
    (_compose_edit("pagedserve", lambda s: s["healthcheck"].update(test=["CMD", "true"])), None,
     "pagedserve: no health check of /health"),
    (_compose_edit("pagedserve", lambda s: s.update(expose=["8080"])), None, "listens on 8000, but exposes"),
    (_compose_edit("pagedserve", lambda s: s["command"].append("--port=9000")), None,
     "nginx proxies to pagedserve:8000, which is no server's port"),
    (_compose_edit("pagedserve", lambda s: s.update(stop_grace_period="3s")), None, "stop_grace_period 3s"),
    (_compose_edit("pagedserve", lambda s: s.pop("restart")), None, "restart policy None"),
    (_compose_edit("pagedserve", lambda s: s["volumes"].append("cache:/cache")), None, "volume cache is not declared"),
    (_compose_edit("open-webui", lambda s: s["environment"].update(OPENAI_API_BASE_URL="http://pagedserve:8080/v1")),
     None, "open-webui: OPENAI_API_BASE_URL asks pagedserve:8080, which answers on 8000"),
    (_compose_edit("open-webui", lambda s: s["environment"].update(OPENAI_API_BASE_URL="http://pagedserve:8000")),
     None, "must end in /v1"),
    (_compose_edit("open-webui", lambda s: s["environment"].update(OPENAI_API_KEY="other")), None,
     "open-webui: sends the API key 'other'"),
    (_compose_edit("lb", lambda s: s.update(ports=["8000:80"])), None, "nginx listens on 8000, but the published"),
    (None, "server { listen 8000; location / { proxy_pass http://open-webui:8080; } }",
     "nginx proxies to open-webui:8080, which is no server's port"),
])
def test_compose_checks_catch_a_broken_file(compose, conf, expected):
    compose = compose or compose_checks.interpolate(compose_file(), {})
    problems = compose_checks.compose_problems(compose, entrypoint(), conf or nginx_conf())
    assert any(expected in problem for problem in problems), problems


@pytest.mark.skipif(shutil.which("nginx") is None, reason="nginx is not installed")
def test_nginx_conf_is_valid_nginx(tmp_path):
    (tmp_path / "nginx.conf").write_text(
        f"pid {tmp_path}/nginx.pid;\nerror_log {tmp_path}/error.log;\nevents {{}}\n"
        f"http {{ access_log off; include {DEPLOY / 'nginx.conf'}; }}\n")
    result = subprocess.run(["nginx", "-t", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
