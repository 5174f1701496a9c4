"""Multi-node serving on Ray, for real: two hosts made from network namespaces on this machine (joined by a
veth pair, addresses this test makes and removes), a Ray head in one and a Ray worker node in the other,
then `serve --tensor-parallel-size 2 --distributed-executor-backend ray` on the head with one rank on each
host answers the OpenAI API with the single-process engine's greedy tokens.

Needs root (ip netns, unshare); without it the test fails saying so. It stops every process it started, by
pid (each namespace's own), and deletes the namespaces.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from server_process import wait_until
from pagedserve import LLM, SamplingParams

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
SUBNET = "10.213.17"           # the two test hosts' own addresses, on their own veth pair only
HEAD_IP, NODE_IP = f"{SUBNET}.1", f"{SUBNET}.2"
PORT = 8123                    # inside the head's namespace: no other server listens there


def sh(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, check=check, timeout=120)


@pytest.fixture
def two_hosts():
    if os.geteuid() != 0 or shutil.which("ip") is None or shutil.which("unshare") is None:
        pytest.fail("this test makes two hosts from network namespaces: it needs root, `ip` and `unshare`")
    tag = f"ps{os.getpid() % 100000}"
    head, node = f"{tag}h", f"{tag}n"
    try:
        sh("ip", "netns", "add", head)
        sh("ip", "netns", "add", node)
        sh("ip", "link", "add", f"{head}0", "type", "veth", "peer", "name", f"{node}0")
        for ns, address in ((head, HEAD_IP), (node, NODE_IP)):
            sh("ip", "link", "set", f"{ns}0", "netns", ns)
            sh("ip", "-n", ns, "addr", "add", f"{address}/24", "dev", f"{ns}0")
            sh("ip", "-n", ns, "link", "set", f"{ns}0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
        yield head, node
    finally:
        for ns in (head, node):
            _stop_processes_in(ns)
            sh("ip", "netns", "del", ns, check=False)


def _stop_processes_in(ns: str) -> None:
    """Everything running in our namespace is ours: TERM, then KILL what is left."""
    def pids() -> list[int]:
        listed = sh("ip", "netns", "pids", ns, check=False).stdout.split()
        return [int(pid) for pid in listed if pid != str(os.getpid())]

    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids():
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        try:
            wait_until(lambda: not pids(), f"the processes of {ns} to stop", timeout=15)
            return
        except AssertionError:
            continue


def in_host(ns: str, *command: str, private_ray_dir: bool = False) -> list[str]:
    """A command run on test host `ns`. A second Ray node on one machine needs its own /tmp/ray (its sockets
    and session files), so its host gets a private mount namespace with a tmpfs there."""
    if private_ray_dir:
        Path("/tmp/ray").mkdir(exist_ok=True)
        inner = " ".join(command)
        return ["ip", "netns", "exec", ns, "unshare", "-m", "--propagation", "private", "sh", "-c",
                f"mount -t tmpfs tmpfs /tmp/ray && exec {inner}"]
    return ["ip", "netns", "exec", ns, *command]


def http(ns: str, path: str, body: dict | None = None) -> tuple[int, str]:
    """A request to the server from inside the head host (its loopback), through curl."""
    command = ["curl", "-s", "-m", "120", "-o", "-", "-w", "\n%{http_code}", f"http://127.0.0.1:{PORT}{path}"]
    if body is not None:
        command += ["-H", "Content-Type: application/json", "-d", json.dumps(body)]
    result = subprocess.run(in_host(ns, *command), capture_output=True, text=True, timeout=180)
    text, _, code = result.stdout.rpartition("\n")
    return int(code or 0), text


def test_tp2_across_two_ray_nodes_answers_like_one_process(two_hosts, tiny_llama_dir, tmp_path, request,
                                                          restore_torch_threads):
    if shutil.which("curl") is None:
        pytest.fail("curl is needed to reach the server inside its namespace")
    head, node = two_hosts
    env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_USAGE_STATS_ENABLED": "0", "RAY_ADDRESS": f"{HEAD_IP}:6379"}
    ray = str(BIN / "ray")
    # NOTE: short: Ray's unix socket paths under it must stay within 107 bytes
    ray_dir = tempfile.mkdtemp(prefix="psray", dir="/tmp")
    request.addfinalizer(lambda: shutil.rmtree(ray_dir, ignore_errors=True))
    sh_env = {"env": env, "capture_output": True, "text": True, "timeout": 180}
    started = subprocess.run(in_host(head, ray, "start", "--head", f"--node-ip-address={HEAD_IP}", "--port=6379",
                                     "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats",
                                     f"--temp-dir={ray_dir}"), **sh_env)
    assert started.returncode == 0, started.stderr[-2000:]
    joined = subprocess.run(in_host(node, ray, "start", f"--address={HEAD_IP}:6379", f"--node-ip-address={NODE_IP}",
                                    "--num-cpus=1", "--disable-usage-stats", private_ray_dir=True), **sh_env)
    assert joined.returncode == 0, joined.stderr[-2000:]

    log_path = tmp_path / "serve.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(in_host(head, sys.executable, "-m", "pagedserve", "serve", str(tiny_llama_dir),
                                          "--tensor-parallel-size", "2", "--distributed-executor-backend", "ray",
                                          "--port", str(PORT), "--dtype", "float32", "--num-kv-blocks", "64",
                                          "--served-model-name", "tiny"),
                                  env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_until(lambda: server.poll() is not None or http(head, "/health")[0] == 200,
                   lambda: "the server to be ready: " + log_path.read_text()[-3000:], timeout=240)
        assert server.poll() is None, log_path.read_text()[-3000:]
        log_text = log_path.read_text()
        assert f"({HEAD_IP})" in log_text.split("rank 0 of 2")[1].splitlines()[0], log_text[-3000:]
        assert f"({NODE_IP})" in log_text.split("rank 1 of 2")[1].splitlines()[0], log_text[-3000:]

        prompts = ["The capital of France is", "def hello(name):"]
        code, text = http(head, "/v1/completions", {"model": "tiny", "prompt": prompts, "max_tokens": 10,
                                                    "temperature": 0, "logprobs": 1})
        assert code == 200, text
        choices = sorted(json.loads(text)["choices"], key=lambda choice: choice["index"])
    finally:
        server.terminate()
        server.wait(60)

    reference = LLM(str(tiny_llama_dir), dtype="float32", num_threads=1, cpu_threads_bind="nobind", num_kv_blocks=64)
    expected = reference.generate(prompts, SamplingParams(temperature=0, max_tokens=10, logprobs=1))
    for choice, output in zip(choices, expected):
        assert choice["text"] == output.outputs[0].text
        ours = choice["logprobs"]["token_logprobs"]
        theirs = [entry[token].logprob for entry, token in zip(output.outputs[0].logprobs, output.outputs[0].token_ids)]
        assert ours == pytest.approx(theirs, abs=1e-4)
