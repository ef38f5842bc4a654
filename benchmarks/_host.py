"""Shared by the benchmark scripts: how busy the shared machine was while they measured."""
from __future__ import annotations

import os
import platform
import resource


def cpu_busy_s() -> float:
    """Busy CPU seconds of the whole machine so far (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return (sum(v) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")


def own_cpu_s() -> float:
    """CPU seconds of this process and its finished children."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


def cpu_info() -> dict:
    """The processor every result file names: host, model, family, SIMD flags that matter here, cores, Python."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    flags = fields.get("flags", "").split()
    simd = [f for f in ("avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_bf16") if f in flags]
    return {"host": platform.node(), "cpu": fields.get("model name", platform.processor() or "?"),
            "cpu_family": fields.get("cpu family", "?"), "simd_flags": simd, "simd": " ".join(simd),
            "logical_cpus": os.cpu_count(), "python": platform.python_version()}
