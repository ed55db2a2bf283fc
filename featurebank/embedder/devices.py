"""The device names :func:`featurebank.embedder.session.open_model` accepts.

``auto``: CUDA when onnxruntime can run it, else the CPU (said on stderr); ``cpu``; ``cuda``:
fail loudly when CUDA does not run. Kept apart from the session code so that the command
line and the service settings can list them without importing onnxruntime.
"""

from __future__ import annotations

__all__ = ["DEVICES", "DEFAULT_DEVICE"]

DEVICES = ("auto", "cpu", "cuda")
DEFAULT_DEVICE = "auto"
