"""Shared by the benchmark scripts: the one description of the machine they measured on (`host_info`,
`host_line`) and how busy that shared machine was meanwhile (`cpu_busy_s`, `own_cpu_s`)."""
from __future__ import annotations

import importlib
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


def host_info() -> dict:
    """The machine every result file names: host, processor (model, family, the SIMD flags that matter here),
    logical CPUs, memory, Python, numpy (and its BLAS), onnxruntime and torch (and its threads) where installed,
    the CUDA device where torch sees one, and the load average now."""
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
    info = {"host": platform.node(), "cpu": fields.get("model name", platform.processor() or "?"),
            "cpu_family": fields.get("cpu family", "?"), "simd_flags": simd, "simd": " ".join(simd),
            "logical_cpus": os.cpu_count(), "python": platform.python_version(),
            "load_avg_at_start": os.getloadavg()[0]}
    try:
        with open("/proc/meminfo") as f:
            info["mem_total_gib"] = round(int(f.readline().split()[1]) / 2**20, 1)
    except OSError:
        pass
    import numpy as np
    info["numpy"], info["numpy_blas"] = np.__version__, "?"
    try:
        b = np.show_config(mode="dicts").get("Build Dependencies", {}).get("blas", {})
        info["numpy_blas"] = f"{b.get('name', '?')} {b.get('version', '')}".strip()
    except Exception:  # older numpy: no dict mode
        pass
    for name in ("onnxruntime", "torch"):
        try:
            info[name] = importlib.import_module(name).__version__
        except ImportError:
            info[name] = "not installed"
    if info["torch"] != "not installed":
        import torch
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    return info


def host_line(info: dict | None = None) -> str:
    """`host_info` in one line, for a result file's "Machine:"."""
    m = info or host_info()
    torch = f", torch {m['torch']}" + (f" ({m['torch_threads']} threads)" if "torch_threads" in m else "")
    return (f"{m['host']} — {m.get('gpu') or m['cpu']}, {m['logical_cpus']} logical CPUs, Python {m['python']}"
            f"{torch}, onnxruntime {m['onnxruntime']}")
