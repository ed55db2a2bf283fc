"""Machine and version facts recorded with every benchmark result."""

from __future__ import annotations

import importlib.metadata as md
import os
import platform


def machine_info() -> dict:
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {}
    for dist in ("featurebank", "onnxruntime-gpu", "onnxruntime", "onnx", "torch", "timm", "numpy", "pillow",
                 "faiss-cpu", "scikit-learn"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            pass
    return {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "load_avg_at_start": os.getloadavg(),
        "versions": versions,
    }
