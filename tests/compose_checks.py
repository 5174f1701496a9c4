"""Consistency checks of deploy/docker-compose.yml that the compose-spec schema cannot make; each problem is a
sentence naming the service.

The file is read as written and its `${VAR:-default}` references are filled in from a given environment, as
compose does. Checked: each pagedserve service's command parses with the real CLI and listens on its exposed
port on all interfaces, it has a health check, a restart policy, a stop grace period longer than its
--shutdown-timeout and declared volumes; URLs in other services' environment name a service and its port;
Open WebUI sends the key the server wants; nginx listens where the lb publishes and proxies to a server.
"""
from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlparse

from pagedserve.config.duration import parse_duration
from tests.serve_command import parse_serve

Service = dict[str, Any]
_VARIABLE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")
_RESTART_POLICIES = ("always", "unless-stopped", "on-failure")


def interpolate(node: Any, environ: dict[str, str]) -> Any:
    """The compose file with ${VAR}, ${VAR:-default} and $VAR filled in from `environ` ($$ is a $)."""
    if isinstance(node, dict):
        return {key: interpolate(value, environ) for key, value in node.items()}
    if isinstance(node, list):
        return [interpolate(item, environ) for item in node]
    if isinstance(node, str):
        def substitute(match: re.Match) -> str:
            if match[0] == "$$":
                return "$"
            name = match[1] or match[3]
            return environ.get(name) or (match[2] if match[2] is not None else "")
        return _VARIABLE.sub(substitute, node)
    return node


def environment(service: Service) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {key: str(value) for key, value in env.items()}


def server_services(compose: dict[str, Any]) -> dict[str, Service]:
    """The services built from deploy/Dockerfile: pagedserve servers."""
    return {name: service for name, service in compose["services"].items()
            if str(service.get("build", {}).get("dockerfile", "")).endswith("deploy/Dockerfile")}


def serve_arguments(service: Service, entrypoint: list[str]) -> list[str]:
    words = [*service.get("entrypoint", entrypoint), *service.get("command", [])]
    start = next(index for index in range(len(words)) if words[index:index + 2] == ["pagedserve", "serve"])
    return words[start + 2:]


def compose_problems(compose: dict[str, Any], entrypoint: list[str], nginx_conf: str) -> list[str]:
    """Problems of an interpolated compose file (see `interpolate`)."""
    servers = server_services(compose)
    if not servers:
        return ["no service is built from deploy/Dockerfile"]
    problems: list[str] = []
    ports: dict[str, int] = {}              # service -> the port it answers HTTP on inside the network
    for name, service in servers.items():
        service_problems, ports[name] = _server_problems(name, service, compose, entrypoint)
        problems += service_problems
    for name, service in compose["services"].items():
        if "nginx" in str(service.get("image", "")):
            lb_problems, ports[name] = _lb_problems(name, service, servers, ports, nginx_conf)
            problems += lb_problems
    for name, service in compose["services"].items():
        problems += _url_problems(name, service, ports)
        problems += _api_key_problems(name, service, servers)
    return problems


def _server_problems(name: str, service: Service, compose: dict[str, Any],
                     entrypoint: list[str]) -> tuple[list[str], int]:
    try:
        server = parse_serve(serve_arguments(service, entrypoint))["server"]
    except (ValueError, SystemExit) as error:
        return [f"{name}: its command does not parse: {error}"], 0
    problems = []
    if server.host != "0.0.0.0":
        problems.append(f"{name}: listens on {server.host}, which other containers cannot reach")
    if str(server.port) not in [str(port) for port in service.get("expose", [])]:
        problems.append(f"{name}: listens on {server.port}, but exposes {service.get('expose')}")
    test = " ".join(service.get("healthcheck", {}).get("test", []))
    if "/opt/pagedserve/healthcheck.py" not in test and "/health" not in test:
        problems.append(f"{name}: no health check of /health")
    if service.get("restart") not in _RESTART_POLICIES:
        problems.append(f"{name}: restart policy {service.get('restart')!r} does not bring it back")
    grace = parse_duration(str(service.get("stop_grace_period", "10s")))
    if grace <= server.shutdown_timeout:
        problems.append(f"{name}: stop_grace_period {grace:g}s leaves no time after --shutdown-timeout "
                        f"{server.shutdown_timeout:g}s; a stop would kill it mid-drain")
    for volume in service.get("volumes", []):
        source = str(volume).split(":")[0]
        if not source.startswith((".", "/")) and source not in (compose.get("volumes") or {}):
            problems.append(f"{name}: volume {source} is not declared under volumes")
    return problems, server.port


def _lb_problems(name: str, service: Service, servers: dict[str, Service], ports: dict[str, int],
                 nginx_conf: str) -> tuple[list[str], int]:
    listen = re.search(r"^\s*listen\s+(\d+)", nginx_conf, re.M)
    listen_port = int(listen[1]) if listen else 80
    problems = []
    published = [str(mapping).rsplit(":", 1)[-1] for mapping in service.get("ports", [])]
    if str(listen_port) not in published:
        problems.append(f"{name}: nginx listens on {listen_port}, but the published container ports are {published}")
    upstreams = re.findall(r"http://([\w.-]+):(\d+)", nginx_conf)
    if not upstreams:
        problems.append(f"{name}: nginx.conf proxies to no http://SERVICE:PORT")
    for host, port in upstreams:
        if host not in servers or int(port) != ports.get(host):
            problems.append(f"{name}: nginx proxies to {host}:{port}, which is no server's port")
    if not any(servers.get(dependency) is not None for dependency in service.get("depends_on", {})):
        problems.append(f"{name}: does not wait for a server (depends_on)")
    return problems, listen_port


def _url_problems(name: str, service: Service, ports: dict[str, int]) -> list[str]:
    problems = []
    for variable, value in environment(service).items():
        url = urlparse(value)
        if url.scheme not in ("http", "https") or url.hostname not in ports:
            continue
        if url.port != ports[url.hostname]:
            problems.append(f"{name}: {variable} asks {url.hostname}:{url.port}, which answers on "
                            f"{ports[url.hostname]}")
        if variable.startswith("OPENAI_API_BASE") and url.path.rstrip("/") != "/v1":
            problems.append(f"{name}: {variable} must end in /v1, the OpenAI API's root, not {url.path!r}")
    return problems


def _api_key_problems(name: str, service: Service, servers: dict[str, Service]) -> list[str]:
    key = environment(service).get("OPENAI_API_KEY")
    if key is None:
        return []
    wanted = {environment(server).get("PAGEDSERVE_API_KEY") for server in servers.values()}
    return [] if wanted == {key} else [f"{name}: sends the API key {key!r}, the servers want {sorted(map(str, wanted))}"]
