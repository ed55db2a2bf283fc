"""Helpers for the store tests: space fingerprints, seeded keys and vectors, child-process env."""

from __future__ import annotations

import hashlib
import os
import sys
from pathlib import Path

import numpy as np
import featurebank

REPO_ROOT = Path(featurebank.__file__).resolve().parents[1]
FP_A = hashlib.sha256(b"space-a").hexdigest()
FP_B = hashlib.sha256(b"space-b").hexdigest()


def make_keys(n: int, start: int = 0) -> list[str]:
    """n distinct sha256 hex keys, deterministic."""
    return [hashlib.sha256(f"image-{i}".encode()).hexdigest() for i in range(start, start + n)]


def make_vectors(n: int, dim: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)


def subprocess_env() -> dict[str, str]:
    """Environment for child Python processes that must import this checkout of featurebank."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["PYTHONUNBUFFERED"] = "1"
    return env


PYTHON = sys.executable
