"""Consistency checks of rendered Kubernetes objects that no schema can make: each returns the problems found,
as sentences naming the object, so a test asserts an empty list and a broken manifest says what broke.

What is checked: Services select pods and reach their ports; probes ask pagedserve's /health on a port the
container has; a container running `pagedserve serve` parses with the real CLI and listens where its port
says; volumes, claims, env references and StatefulSet Services exist; every container has CPU and memory
requests and limits; Ray workers find a head Service that reaches the head's `ray start --head` port.
"""
from __future__ import annotations

import math
import re
import shlex
from typing import Any, Iterator

from tests.serve_command import HEALTH_PATH, parse_serve

WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet")
PROBES = ("startupProbe", "readinessProbe", "livenessProbe")
_K8S_VARIABLE = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
_SHELL_VARIABLE = re.compile(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?")

Obj = dict[str, Any]


def workloads(objects: list[Obj]) -> Iterator[Obj]:
    return (obj for obj in objects if obj["kind"] in WORKLOAD_KINDS)


def containers(workload: Obj) -> list[Obj]:
    return workload["spec"]["template"]["spec"]["containers"]


def label(obj: Obj) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def env_values(container: Obj) -> dict[str, str]:
    """The container's environment as the kubelet would give it (a Secret's value as "<secret>")."""
    values = {}
    for variable in container.get("env", []):
        source = variable.get("valueFrom", {})
        if "value" in variable:
            values[variable["name"]] = str(variable["value"])
        elif "resourceFieldRef" in source:
            kind, resource = source["resourceFieldRef"]["resource"].split(".")
            amount = container.get("resources", {}).get(kind, {}).get(resource)
            # Without a limit the kubelet gives the node's capacity; any whole number stands for it here.
            values[variable["name"]] = str(_whole_units(amount)) if amount is not None else "1"
        else:
            values[variable["name"]] = "<secret>"
    return values


def _whole_units(quantity: str | int) -> int:
    """A CPU or memory quantity rounded up to whole units, as a resourceFieldRef with divisor 1 gives it."""
    text = str(quantity)
    return math.ceil(float(text[:-1]) / 1000) if text.endswith("m") else math.ceil(float(text))


def command_line(container: Obj, entrypoint: list[str]) -> list[str]:
    """What the container runs: its command (else the image's entrypoint) and args, with $(VAR) expanded."""
    env = env_values(container)
    words = [*container.get("command", entrypoint), *container.get("args", [])]
    return [_K8S_VARIABLE.sub(lambda match: env.get(match[1], match[0]), word) for word in words]


def script_lines(words: list[str]) -> list[str]:
    """The logical lines of a `sh -c SCRIPT` command (continuations joined), or the words as one line."""
    if "-c" in words and words.index("-c") + 1 < len(words):
        script = words[words.index("-c") + 1].replace("\\\n", " ")
        return [line.strip() for line in script.splitlines() if line.strip()]
    return [shlex.join(words)]


def shell_words(line: str, env: dict[str, str]) -> list[str]:
    return [_SHELL_VARIABLE.sub(lambda match: env.get(match[1], match[0]), word) for word in shlex.split(line)]


def find_command(container: Obj, entrypoint: list[str], program: list[str]) -> list[str] | None:
    """The arguments after `program` (e.g. ["pagedserve", "serve"]) in what the container runs, or None."""
    for line in script_lines(command_line(container, entrypoint)):
        try:
            words = shell_words(line, env_values(container))
        except ValueError:       # a line of a here-document, not a command
            continue
        for start in range(len(words) - len(program) + 1):
            if words[start:start + len(program)] == program:
                return words[start + len(program):]
    return None


def named_port(container: Obj, port: int | str) -> int | None:
    for entry in container.get("ports", []):
        if port in (entry.get("name"), entry["containerPort"]):
            return entry["containerPort"]
    return None


def selects(selector: dict[str, str], workload: Obj) -> bool:
    labels = workload["spec"]["template"]["metadata"].get("labels", {})
    return bool(selector) and all(labels.get(key) == value for key, value in selector.items())


def manifest_problems(objects: list[Obj], entrypoint: list[str]) -> list[str]:
    problems: list[str] = []
    for workload in workloads(objects):
        problems += _workload_problems(workload, objects, entrypoint)
    for service in (obj for obj in objects if obj["kind"] == "Service"):
        problems += _service_problems(service, objects)
    return problems


def _workload_problems(workload: Obj, objects: list[Obj], entrypoint: list[str]) -> list[str]:
    name, spec = label(workload), workload["spec"]["template"]["spec"]
    problems = []
    if not selects(workload["spec"]["selector"].get("matchLabels", {}), workload):
        problems.append(f"{name}: the selector does not match the pod template's labels")
    volumes = {volume["name"]: volume for volume in spec.get("volumes", [])}
    claims = {obj["metadata"]["name"] for obj in objects if obj["kind"] == "PersistentVolumeClaim"}
    for volume in volumes.values():
        if "persistentVolumeClaim" in volume and volume["persistentVolumeClaim"]["claimName"] not in claims:
            problems.append(f"{name}: volume {volume['name']} claims a PersistentVolumeClaim that is not defined")
    if workload["kind"] == "StatefulSet":
        problems += _statefulset_service_problems(workload, objects)
    for container in spec["containers"]:
        where = f"{name} container {container['name']}"
        problems += [f"{where}: mounts undefined volume {mount['name']}"
                     for mount in container.get("volumeMounts", []) if mount["name"] not in volumes]
        problems += _resource_problems(container, where)
        problems += _probe_problems(container, where)
        problems += _env_problems(container, where)
        problems += _server_problems(container, where, entrypoint)
        problems += _ray_worker_problems(container, where, objects, entrypoint)
    return problems


def _resource_problems(container: Obj, where: str) -> list[str]:
    resources = container.get("resources", {})
    return [f"{where}: no {kind} {resource}" for kind in ("requests", "limits") for resource in ("cpu", "memory")
            if resource not in resources.get(kind, {})]


def _probe_problems(container: Obj, where: str) -> list[str]:
    problems = []
    for probe_name in PROBES:
        http = container.get(probe_name, {}).get("httpGet")
        if http is None:
            continue
        if http.get("path") != HEALTH_PATH:
            problems.append(f"{where}: {probe_name} asks {http.get('path')}, not {HEALTH_PATH}")
        if named_port(container, http["port"]) is None:
            problems.append(f"{where}: {probe_name} port {http['port']} is not a port of the container")
    return problems


def _env_problems(container: Obj, where: str) -> list[str]:
    defined = set(env_values(container))
    used = {variable for word in [*container.get("command", []), *container.get("args", [])]
            for variable in _K8S_VARIABLE.findall(word)}
    return [f"{where}: $({variable}) is used but not in env" for variable in sorted(used - defined)]


def _server_problems(container: Obj, where: str, entrypoint: list[str]) -> list[str]:
    arguments = find_command(container, entrypoint, ["pagedserve", "serve"])
    if arguments is None:
        return []
    problems = [f"{where}: serves without a {probe}" for probe in ("readinessProbe", "livenessProbe")
                if probe not in container]
    try:
        server = parse_serve(arguments)["server"]
    except (ValueError, SystemExit) as error:
        return problems + [f"{where}: `pagedserve serve {shlex.join(arguments)}` does not parse: {error}"]
    if server.host != "0.0.0.0":
        problems.append(f"{where}: the server listens on {server.host}, which other pods cannot reach")
    if named_port(container, "http") != server.port:
        problems.append(f"{where}: the server listens on {server.port}, but the port named http is "
                        f"{named_port(container, 'http')}")
    return problems


def _statefulset_service_problems(workload: Obj, objects: list[Obj]) -> list[str]:
    wanted = workload["spec"].get("serviceName")
    services = [obj for obj in objects if obj["kind"] == "Service" and obj["metadata"]["name"] == wanted]
    if not services:
        return [f"{label(workload)}: its serviceName {wanted} is not a Service here"]
    service = services[0]
    problems = []
    if service["spec"].get("clusterIP") != "None":
        problems.append(f"{label(workload)}: its Service {wanted} is not headless (clusterIP: None)")
    if not selects(service["spec"].get("selector", {}), workload):
        problems.append(f"{label(workload)}: its Service {wanted} does not select its pods")
    return problems


def _service_problems(service: Obj, objects: list[Obj]) -> list[str]:
    selector = service["spec"].get("selector", {})
    selected = [workload for workload in workloads(objects) if selects(selector, workload)]
    if not selected:
        return [f"{label(service)}: selects no pods"]
    problems = []
    for port in service["spec"].get("ports", []):
        target = port.get("targetPort", port["port"])
        for workload in selected:
            if not any(named_port(container, target) for container in containers(workload)):
                problems.append(f"{label(service)}: port {port['port']} targets {target}, "
                                f"which no container of {label(workload)} has")
    return problems


def _ray_worker_problems(container: Obj, where: str, objects: list[Obj], entrypoint: list[str]) -> list[str]:
    arguments = find_command(container, entrypoint, ["ray", "start"])
    address = next((word.split("=", 1)[1] for word in arguments or [] if word.startswith("--address=")), None)
    if address is None:
        return []
    host, _, port = address.partition(":")
    services = [obj for obj in objects if obj["kind"] == "Service" and obj["metadata"]["name"] == host]
    if not services:
        return [f"{where}: joins Ray at {address}, but {host} is not a Service here"]
    service = services[0]
    problems = []
    if not service["spec"].get("publishNotReadyAddresses"):
        problems.append(f"{where}: {host} must publish not-ready addresses: the head is ready only after "
                        "the workers joined")
    service_ports = {str(entry["port"]): entry.get("targetPort", entry["port"]) for entry in service["spec"]["ports"]}
    if port not in service_ports:
        return problems + [f"{where}: joins Ray at {address}, but {host} has no port {port}"]
    for head in (obj for obj in workloads(objects) if selects(service["spec"]["selector"], obj)):
        for head_container in containers(head):
            head_arguments = find_command(head_container, entrypoint, ["ray", "start"]) or []
            if "--head" in head_arguments and f"--port={named_port(head_container, service_ports[port])}" \
                    not in head_arguments:
                problems.append(f"{where}: {host}:{port} does not reach the port `ray start --head` listens on")
    return problems
