"""`featurebank doctor`: what onnxruntime can run here, and what to fix."""

from __future__ import annotations

import importlib.metadata as md
import platform
from typing import Any

import numpy as np
import onnxruntime as ort

from featurebank.embedder.session import cuda_status, physical_cores

__all__ = ["run_doctor"]


def _tiny_model() -> bytes:
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.eye(4, dtype=np.float32), "w")
    node = helper.make_node("MatMul", ["x", "w"], ["y"])
    graph = helper.make_graph([node], "doctor", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    return model.SerializeToString()


def _distributions() -> dict[str, str]:
    found = {}
    for dist in md.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith("onnxruntime"):
            found[name] = dist.version
    return found


def run_doctor() -> dict[str, Any]:
    """Check the onnxruntime install; returns a dict with ``ok``, findings and ``text``."""
    dists = _distributions()
    problems: list[str] = []
    notes: list[str] = []
    if "onnxruntime" in dists and any(d.startswith("onnxruntime-gpu") for d in dists):
        problems.append(
            "both onnxruntime and onnxruntime-gpu are installed; they share the `onnxruntime` import and one "
            "overwrites the other. Fix: pip uninstall -y onnxruntime onnxruntime-gpu && pip install onnxruntime-gpu"
        )
    if not any(d.startswith("onnxruntime-gpu") for d in dists):
        notes.append("onnxruntime-gpu is not installed: CPU only (pip install onnxruntime-gpu for CUDA; it runs on CPU too)")
    results = {}
    x = np.arange(8, dtype=np.float32).reshape(2, 4)
    for provider in ort.get_available_providers():
        if provider == "CUDAExecutionProvider":
            usable, reason = cuda_status()
            if not usable:
                results[provider] = {"ok": False, "detail": reason}
                continue
        if provider not in ("CPUExecutionProvider", "CUDAExecutionProvider"):
            results[provider] = {"ok": None, "detail": "listed; featurebank uses CUDA and CPU only"}
            continue
        try:
            sess = ort.InferenceSession(_tiny_model(), providers=[provider])
            y = sess.run(None, {"x": x})[0]
            ok = sess.get_providers()[0] == provider and np.allclose(y, x)
            results[provider] = {"ok": bool(ok), "detail": "tiny inference ran" if ok else "fell back to another provider"}
        except Exception as exc:  # report, do not crash the doctor
            results[provider] = {"ok": False, "detail": str(exc).splitlines()[0][:200]}
    if not results.get("CPUExecutionProvider", {}).get("ok"):
        problems.append("the CPU provider failed a tiny inference: reinstall onnxruntime-gpu")
    cuda = results.get("CUDAExecutionProvider")
    if cuda and not cuda["ok"]:
        notes.append(f"CUDA: {cuda['detail']}. Embedding runs on the CPU; with a GPU, install CUDA 12/13 and cuDNN 9 "
                     "(e.g. pip install 'onnxruntime-gpu[cuda,cudnn]') and run `featurebank doctor` again")
    report = {
        "ok": not problems,
        "onnxruntime": ort.__version__,
        "distributions": dists,
        "device": ort.get_device(),
        "providers": results,
        "cores": physical_cores(),
        "python": platform.python_version(),
        "problems": problems,
        "notes": notes,
    }
    lines = [f"onnxruntime {ort.__version__} ({', '.join(f'{k} {v}' for k, v in dists.items())}), {physical_cores()} cores"]
    for name, r in results.items():
        mark = {True: "ok  ", False: "FAIL", None: "--  "}[r["ok"]]
        lines.append(f"  [{mark}] {name}: {r['detail']}")
    lines += [f"problem: {p}" for p in problems] + [f"note: {n}" for n in notes]
    lines.append("embedding will run on " + ("CUDA" if cuda and cuda["ok"] else "the CPU"))
    report["text"] = "\n".join(lines)
    return report
