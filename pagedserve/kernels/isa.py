"""The instruction sets the CPU kernels are built for, and the one this process runs.

Each variant is one build of the same C++ sources with its own compiler flags, in its own cache
directory; the sources pick their SIMD paths from the macros those flags define (`__AVX2__` and
`__FMA__` for the AVX2 paths, `__AVX512VNNI__` / `__AVX512VL__` for the VNNI dot products). The
variant is chosen at run time from the CPU's flags, the widest one it can execute, unless
$PAGEDSERVE_CPU_ISA names one (say `avx2` on an AVX-512 machine, to run or test that path there).

NOTE: the x86 variants name their instruction sets explicitly (the x86-64 psABI levels) rather than
-march=native: a build then runs on every CPU with those flags, whoever compiled it, and never uses
what a CPU reports but cannot run well or at all (some VMs report AMX, which faults there).
`native` is kept for CPUs that have neither set (older x86, ARM): it compiles the portable paths.
"""
from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

ISA_ENV = "PAGEDSERVE_CPU_ISA"

# x86-64-v3: what gcc's -march=x86-64-v3 assumes, as /proc/cpuinfo names it (abm is LZCNT).
_X86_64_V3 = frozenset({"avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "movbe", "abm", "xsave"})
_X86_64_V4 = _X86_64_V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}


@dataclass(frozen=True)
class IsaVariant:
    """One build of the kernels: its compiler flags and the CPU flags it needs to run."""

    name: str
    description: str
    compile_flags: tuple[str, ...]
    cpu_flags: frozenset[str]           # as /proc/cpuinfo's "flags" line names them
    is_x86: bool = True

    def missing_flags(self, cpu: frozenset[str]) -> list[str]:
        """The flags this variant needs that the CPU lacks ([] when it can run it)."""
        return sorted(self.cpu_flags - cpu)


VARIANTS: dict[str, IsaVariant] = {
    "avx512": IsaVariant("avx512", "AVX-512 F/BW/DQ/VL with VNNI", ("-march=x86-64-v4", "-mavx512vnni"),
                         _X86_64_V4 | {"avx512_vnni"}),
    "avx2": IsaVariant("avx2", "AVX2 with FMA and F16C", ("-march=x86-64-v3",), _X86_64_V3),
    "native": IsaVariant("native", "whatever the compiler finds on this CPU (portable paths)", ("-march=native",),
                         frozenset(), is_x86=False),
}
# Widest first: the first one the CPU runs is the default.
PREFERENCE = ("avx512", "avx2", "native")


@dataclass(frozen=True)
class CpuInfo:
    """What the choice depends on: the CPU's architecture and its flags."""

    is_x86: bool
    flags: frozenset[str]

    def runs(self, variant: IsaVariant) -> bool:
        return not variant.is_x86 or (self.is_x86 and not variant.missing_flags(self.flags))


def this_cpu() -> CpuInfo:
    machine = platform.machine().lower()
    return CpuInfo(machine in ("x86_64", "amd64", "i686", "i386"), frozenset(_cpuinfo_flags().split()))


def _cpuinfo_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line.partition(":")[2]
    except OSError:
        pass
    return ""


def choose_variant(cpu: CpuInfo, requested: str | None) -> IsaVariant:
    """The variant to build and load: `requested` (the value of $PAGEDSERVE_CPU_ISA) when set, else the
    widest this CPU runs. A requested one the CPU cannot run is refused here: it would die on its first
    illegal instruction."""
    if requested:
        name = requested.strip().lower()
        if name not in VARIANTS:
            raise ValueError(f"{ISA_ENV}={requested!r}: expected one of {', '.join(PREFERENCE)}")
        variant = VARIANTS[name]
        if not cpu.runs(variant):
            lacking = ", ".join(variant.missing_flags(cpu.flags)) if cpu.is_x86 else "x86-64"
            raise ValueError(f"{ISA_ENV}={name}: this CPU cannot run the {variant.description} kernels "
                             f"(it lacks {lacking})")
        return variant
    return next(VARIANTS[name] for name in PREFERENCE if cpu.runs(VARIANTS[name]))
