"""Threads and memory in containers: the cgroup CPU quota (v1 and v2), the affinity mask and the cgroup
memory limit decide the defaults. Fake /proc and /sys trees stand for a pod's; the affinity test is real."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pagedserve.engine import host_limits

V2_MOUNTINFO = "30 23 0:26 / /sys/fs/cgroup rw,nosuid shared:4 - cgroup2 cgroup2 rw,nsdelegate\n"
V1_MOUNTINFO = ("31 23 0:27 / /sys/fs/cgroup/cpu,cpuacct rw shared:5 - cgroup cgroup rw,cpu,cpuacct\n"
                "32 23 0:28 /kubepods/pod1 /sys/fs/cgroup/memory rw shared:6 - cgroup cgroup rw,memory\n")


def fake_root(tmp_path: Path, mountinfo: str, cgroup: str, files: dict[str, str]) -> Path:
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/self/mountinfo").write_text(mountinfo)
    (tmp_path / "proc/self/cgroup").write_text(cgroup)
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text + "\n")
    return tmp_path


def test_cgroup_v2_quota_of_a_two_cpu_pod_on_a_big_node(tmp_path, monkeypatch):
    root = fake_root(tmp_path, V2_MOUNTINFO, "0::/kubepods/pod1/ctr\n", {
        "sys/fs/cgroup/kubepods/pod1/ctr/cpu.max": "max 100000",
        "sys/fs/cgroup/kubepods/pod1/cpu.max": "200000 100000",      # cpu: '2' on the pod
        "sys/fs/cgroup/kubepods/cpu.max": "max 100000"})
    assert host_limits.cpu_quota(root) == 2.0
    monkeypatch.setattr(host_limits.psutil, "cpu_count", lambda logical=True: 64)
    monkeypatch.setattr(host_limits.os, "cpu_count", lambda: 128)
    monkeypatch.setattr(host_limits.os, "sched_getaffinity", lambda pid: set(range(128)))
    assert host_limits.default_num_threads(root) == 2


def test_cgroup_v2_fractional_quota_and_no_quota(tmp_path):
    root = fake_root(tmp_path, V2_MOUNTINFO, "0::/\n", {"sys/fs/cgroup/cpu.max": "50000 100000"})
    assert host_limits.cpu_quota(root) == 0.5
    (root / "sys/fs/cgroup/cpu.max").write_text("max 100000\n")
    assert host_limits.cpu_quota(root) is None


def test_cgroup_v1_quota(tmp_path):
    root = fake_root(tmp_path, V1_MOUNTINFO, "4:cpu,cpuacct:/\n3:memory:/kubepods/pod1\n", {
        "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us": "300000",
        "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us": "100000"})
    assert host_limits.cpu_quota(root) == 3.0
    (root / "sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us").write_text("-1\n")
    assert host_limits.cpu_quota(root) is None


def test_cgroup_v2_memory_limit(tmp_path, monkeypatch):
    root = fake_root(tmp_path, V2_MOUNTINFO, "0::/pod\n", {
        "sys/fs/cgroup/pod/memory.max": str(10 * 2**30), "sys/fs/cgroup/pod/memory.current": str(2**30),
        "sys/fs/cgroup/memory.max": "max"})
    assert host_limits.memory_limit(root) == (10 * 2**30, 2**30)
    monkeypatch.setattr(host_limits.psutil, "virtual_memory", lambda: type("M", (), {"available": 200 * 2**30}))
    assert host_limits.available_memory(root) == 9 * 2**30


def test_cgroup_v1_memory_limit_seen_from_inside_the_container(tmp_path):
    """The mount's root is the pod's cgroup, as in a container: /proc/self/cgroup names the same path."""
    root = fake_root(tmp_path, V1_MOUNTINFO, "4:cpu,cpuacct:/\n3:memory:/kubepods/pod1\n", {
        "sys/fs/cgroup/memory/memory.limit_in_bytes": str(4 * 2**30),
        "sys/fs/cgroup/memory/memory.usage_in_bytes": str(2**30)})
    assert host_limits.memory_limit(root) == (4 * 2**30, 2**30)
    (root / "sys/fs/cgroup/memory/memory.limit_in_bytes").write_text("9223372036854771712\n")   # v1's "none"
    assert host_limits.memory_limit(root) is None


def test_no_cgroup_files_means_no_limits(tmp_path):
    root = fake_root(tmp_path, "", "", {})
    assert host_limits.cpu_quota(root) is None and host_limits.memory_limit(root) is None


def test_kv_cache_default_under_a_memory_limit(monkeypatch):
    from pagedserve.config import EngineConfig
    from pagedserve.engine import platform

    monkeypatch.setattr(platform, "available_memory", lambda: 2**30)
    cpu = platform.Platform(platform.torch.device("cpu"), platform.torch.float32, 1)
    assert cpu.kv_cache_bytes(EngineConfig()) == int(0.3 * 2**30)


def test_the_affinity_mask_caps_the_default_threads():
    """A process allowed one core (taskset, a cpuset) starts one thread, whatever the machine has."""
    code = ("import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]}); "
            "from pagedserve.engine.host_limits import default_num_threads; print(default_num_threads())")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "1", result.stderr


def test_cpu_threads_bind_pins_the_threads(tiny_llama_dir):
    """VLLM_CPU_OMP_THREADS_BIND=0 (or --cpu-threads-bind): one thread, on core 0, whatever else is free."""
    code = ("import os; from pagedserve.config import EngineConfig; from pagedserve.engine.platform import Platform; "
            "p = Platform.resolve(EngineConfig(device='cpu', cpu_threads_bind='0'), None); "
            "print(p.num_threads, sorted(os.sched_getaffinity(0)))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "1 [0]", result.stderr
    with pytest.raises(ValueError, match="CPU list"):
        from pagedserve.config import EngineConfig

        EngineConfig(cpu_threads_bind="a-b")
