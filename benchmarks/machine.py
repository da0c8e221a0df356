"""What a CPU benchmark ran on: CPU model, torch's kernels and threads, and the load average.

Figures from different machines (or one machine under different load) are not comparable; every
benchmark result carries `machine_info()` and RESULTS.md rows name `machine_label()`.
"""
from __future__ import annotations

import os
import platform
import re

import torch


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` reports."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _library_version(pattern: str) -> str:
    """The first version number after `pattern` in torch's build configuration, or 'absent'."""
    match = re.search(pattern + r"[^\n]*?v?(\d+(?:\.\d+)+)", torch.__config__.show())
    return match.group(1) if match else "absent"


def machine_info(threads: int | None = None) -> dict:
    """CPU model, cores, torch's CPU kernel level and BLAS/oneDNN versions, threads (`threads`,
    default this process's torch threads), 1/5/15-min load average now."""
    return {
        "cpu_model": cpu_model(),
        "cpus": os.cpu_count(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkl": _library_version("Math Kernel Library Version") if torch.backends.mkl.is_available()
        else "absent",
        "onednn": _library_version("MKL-DNN") if torch.backends.mkldnn.is_available() else "absent",
        "parallel_backend": "OpenMP" if "USE_OPENMP=ON" in torch.__config__.show() else "native",
        "threads": threads or torch.get_num_threads(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def machine_label(info: dict) -> str:
    """One line naming the machine for RESULTS.md, e.g. 'AMD EPYC, 2 cpus, AVX512, MKL 2024.2'."""
    return (f"{info['cpu_model']}, {info['cpus']} cpus, {info['torch_cpu_capability']}, "
            f"MKL {info['mkl']}, oneDNN {info['onednn']}, {info['threads']} threads")
