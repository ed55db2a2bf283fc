"""Sessions: provider policy, a file that is not a model, the doctor."""

from __future__ import annotations

import pytest

from featurebank.embedder.doctor import run_doctor
from featurebank.embedder.session import cuda_status, open_model
from featurebank.errors import NotOnnxModelError, ProviderError


def test_cuda_requested_but_not_running_is_an_error(tiny_model):
    usable, reason = cuda_status()
    if usable:
        pytest.skip("CUDA runs here")
    with pytest.raises(ProviderError, match="--device cuda asked for, but CUDA cannot run here"):
        open_model(tiny_model, device="cuda")
    assert open_model(tiny_model, device="auto").provider == "CPUExecutionProvider"


def test_a_file_that_is_not_a_model_is_refused(tmp_path):
    bad = tmp_path / "m.onnx"
    bad.write_bytes(b"not a model at all")
    with pytest.raises(NotOnnxModelError, match="onnxruntime cannot load"):
        open_model(bad)


def test_doctor_runs_a_tiny_inference_per_provider():
    report = run_doctor()
    assert report["ok"] and report["providers"]["CPUExecutionProvider"]["ok"]
    assert "onnxruntime-gpu" in report["distributions"] and "onnxruntime" not in report["distributions"]
    assert "embedding will run on" in report["text"]
