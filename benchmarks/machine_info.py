"""What machine a benchmark ran on, one reader of /proc for every benchmark script.

``cpu_model()``: the CPU's model name; ``cpu_flags()``: its instruction-set flags (the set of names in
/proc/cpuinfo's ``flags`` line: ``avx2``, ``avx512_vnni``, ``amx_bf16`` ...); ``vector_flags()``: those that
decide which kernels run (avx*, amx*, fma), sorted; ``load_average()``: the 1-minute load, a string.
Empty / ``"unknown"`` where /proc is not there.
"""

from __future__ import annotations

import platform
from functools import cache
from pathlib import Path


@cache
def _cpuinfo() -> list[str]:
    try:
        return Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return []


def cpu_model() -> str:
    for line in _cpuinfo():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def cpu_flags() -> set[str]:
    for line in _cpuinfo():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def vector_flags() -> list[str]:
    return sorted(f for f in cpu_flags() if f.startswith(("avx", "amx", "fma")))


def load_average() -> str:
    try:
        return Path("/proc/loadavg").read_text().split()[0]
    except OSError:
        return "n/a"
