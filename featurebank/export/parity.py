"""Numpy reference poolings and the parity check every export must pass.

The ONNX heads built by :mod:`featurebank.export.heads` are checked against these plain
numpy versions, and the exported graph's outputs against the source model's
(optimum's export validation pattern): :func:`compare_outputs` returns the figures that go
into the model card's ``verification`` field, or raises
:class:`~featurebank.errors.ExportParityError` with them in the message.

Tolerances (per output, rows = samples, each row flattened):

* ``fp32``: cosine similarity >= 0.9999 on every row **and**
  ``max |ref - got| <= 1e-3 * max(|ref|)``. The absolute bound is relative to the
  reference's scale because raw feature maps range from ~1e-3 (tiny random nets) to ~1e2
  (late ReLU maps), so no single absolute number fits all; 1e-3 of the scale is ~100x the
  float32 reassociation noise seen between onnxruntime and torch on conv nets.
* ``fp16``: cosine >= 0.999 on every row and ``max |ref - got| <= 2e-2 * max(|ref|)``;
  fp16 has a 2^-11 ~ 5e-4 unit roundoff that accumulates over depth.

This module imports numpy only, so the embedder side could reuse it too.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from featurebank.artifact import POOLINGS
from featurebank.errors import ExportParityError

__all__ = [
    "TOLERANCES",
    "GEM_EPS",
    "NORM_EPS",
    "PATCH_POOLINGS",
    "pool_reference",
    "compare_outputs",
    "seeded_pixels",
    "normalise_pixels",
]

#: precision -> (min cosine per row, max abs diff relative to max |reference|)
TOLERANCES: dict[str, tuple[float, float]] = {
    "fp32": (0.9999, 1e-3),
    "fp16": (0.999, 2e-2),
}

#: GeM clamps activations to at least this before the power (Radenovic et al. use 1e-6).
GEM_EPS = 1e-6
#: L2 normalisation divides by max(||x||, NORM_EPS), as ``torch.nn.functional.normalize``.
NORM_EPS = 1e-12
#: Poolings over positions: on tokens (NLC) they skip a ViT's prefix (class, register)
#: tokens first, as timm's ``global_pool="avg"`` does.
PATCH_POOLINGS = ("avg", "max", "gem")

_LAYOUTS = ("NCHW", "NLC")


def pool_reference(
    x: np.ndarray,
    pooling: str,
    *,
    layout: str = "NCHW",
    normalize: bool = False,
    gem_p: float = 3.0,
    skip_tokens: int = 0,
) -> np.ndarray:
    """Pool a raw feature map the way the ONNX heads do, in float64 numpy.

    Parameters
    ----------
    x : ndarray of shape (N, C, H, W) for ``layout="NCHW"`` or (N, L, C) for ``"NLC"``
    pooling : ``"avg"``, ``"max"``, ``"gem"`` (``mean(clamp(x, 1e-6)^p)^(1/p)``),
        ``"token"`` (``x[:, 0, :]``, NLC only) or ``"none"`` (map kept as is)
    normalize : L2-normalise over the feature axis (C: axis 1 for NCHW, last for NLC),
        dividing by ``max(norm, 1e-12)`` so zero vectors stay zero instead of NaN
    gem_p : GeM exponent, > 0
    skip_tokens : NLC only: leading (class/register) tokens left out of avg/max/gem

    Returns
    -------
    ndarray of shape (N, C) float32 when pooled, else ``x.shape`` float32.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}; got pooling={pooling!r}")
    if layout not in _LAYOUTS:
        raise ValueError(f"layout must be one of {', '.join(_LAYOUTS)}; got layout={layout!r}")
    if not gem_p > 0:
        raise ValueError(f"gem_p must be > 0; got gem_p={gem_p!r}")
    x = np.asarray(x, dtype=np.float64)
    if pooling != "none":
        want = 4 if layout == "NCHW" else 3
        if x.ndim != want:
            raise ValueError(f"layout={layout!r} needs a {want}-D array; got shape {x.shape}")
    spatial: tuple[int, ...] = (2, 3) if layout == "NCHW" else (1,)
    if skip_tokens and layout == "NLC" and pooling in PATCH_POOLINGS:
        x = x[:, skip_tokens:, :]
    if pooling == "avg":
        y = x.mean(axis=spatial)
    elif pooling == "max":
        y = x.max(axis=spatial)
    elif pooling == "gem":
        y = np.power(np.power(np.maximum(x, GEM_EPS), gem_p).mean(axis=spatial), 1.0 / gem_p)
    elif pooling == "token":
        if layout != "NLC":
            raise ValueError("pooling='token' takes the first token of an (N, tokens, C) map; layout must be 'NLC'")
        y = x[:, 0, :]
    else:
        y = x
    if normalize:
        axis = 1 if (pooling != "none" or layout == "NCHW") else -1
        norm = np.sqrt((y * y).sum(axis=axis, keepdims=True))
        y = y / np.maximum(norm, NORM_EPS)
    return y.astype(np.float32)


def seeded_pixels(n: int, height: int, width: int, channels: int = 3, *, seed: int = 0) -> np.ndarray:
    """Parity inputs with image-like statistics: half smooth seeded gradients, half noise.

    Returns
    -------
    ndarray of shape (n, height, width, channels), uint8, the same for the same arguments.
    """
    rng = np.random.default_rng(seed)
    px = rng.integers(0, 256, size=(n, height, width, channels), dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    for i in range(n // 2):
        phase = rng.uniform(0, 2 * np.pi, size=channels)
        for ch in range(channels):
            wave = 127.5 + 127.5 * np.sin(xx / (5 + 4 * ch) + yy / (9 + 3 * i) + phase[ch])
            px[i, :, :, ch] = wave.astype(np.uint8)
    return px


def normalise_pixels(pixels: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 (N, H, W, C) pixels -> float32 (N, C, H, W) ``(x / 255 - mean) / std``."""
    x = np.asarray(pixels).astype(np.float32) / np.float32(255.0)
    x = (x - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def _row_cosines(ref: np.ndarray, got: np.ndarray) -> np.ndarray:
    a = ref.reshape(ref.shape[0], -1).astype(np.float64)
    b = got.reshape(got.shape[0], -1).astype(np.float64)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    cos = (a * b).sum(axis=1) / np.maximum(na * nb, np.finfo(np.float64).tiny)
    # Two all-zero rows agree perfectly (e.g. a dead ReLU channel block); one zero row does not.
    both_zero = (na == 0) & (nb == 0)
    return np.where(both_zero, 1.0, cos)


def compare_outputs(
    ref: np.ndarray,
    got: np.ndarray,
    precision: str = "fp32",
    *,
    name: str = "output",
    atol: float | None = None,
    min_cosine: float | None = None,
) -> dict[str, Any]:
    """Check an exported output against its reference; return the parity figures.

    Parameters
    ----------
    ref, got : ndarrays of the same shape (N, ...), N >= 1 samples on axis 0
    precision : ``"fp32"`` or ``"fp16"``, selects the default tolerances (module docstring)
    name : output name, used in the error message
    atol : max abs diff allowed; default ``rel * max(|ref|)`` from :data:`TOLERANCES`
    min_cosine : min cosine per row allowed; default from :data:`TOLERANCES`

    Returns
    -------
    dict with ``max_abs_diff`` (float), ``min_cosine`` (float), ``atol`` and
    ``required_cosine`` (the bounds applied).

    Raises
    ------
    ExportParityError
        shapes differ, ``got`` has NaN/inf, or a bound is exceeded; the message carries
        the max difference and the min cosine.

    >>> r = np.ones((2, 4), np.float32)
    >>> compare_outputs(r, r)["min_cosine"]
    1.0
    """
    if precision not in TOLERANCES:
        raise ValueError(f"precision must be one of {', '.join(TOLERANCES)}; got precision={precision!r}")
    ref = np.asarray(ref)
    got = np.asarray(got)
    if ref.shape != got.shape:
        raise ExportParityError(
            f"{name}: exported output has shape {got.shape} but the source model gives {ref.shape}"
        )
    if ref.ndim < 1 or ref.shape[0] == 0:
        raise ValueError(f"compare_outputs needs at least one sample on axis 0; got shape {ref.shape}")
    if not np.all(np.isfinite(got)):
        raise ExportParityError(
            f"{name}: exported output has {int(np.sum(~np.isfinite(got)))} NaN/inf values "
            f"(fp16 overflow?); the source model gives finite values"
        )
    cos_required, rel = TOLERANCES[precision]
    if min_cosine is not None:
        if not 0.0 < min_cosine <= 1.0:
            raise ValueError(f"min_cosine must be in (0, 1]; got min_cosine={min_cosine!r}")
        cos_required = float(min_cosine)
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    if atol is None:
        atol = rel * scale
    elif not atol >= 0:
        raise ValueError(f"atol must be >= 0; got atol={atol!r}")
    max_abs = float(np.max(np.abs(ref.astype(np.float64) - got.astype(np.float64)))) if ref.size else 0.0
    min_cos = float(np.min(_row_cosines(ref, got)))
    figures = {
        "max_abs_diff": max_abs,
        "min_cosine": min_cos,
        "atol": float(atol),
        "required_cosine": float(cos_required),
    }
    if min_cos < cos_required or max_abs > atol:
        raise ExportParityError(
            f"{name}: exported {precision} model disagrees with the source model: "
            f"max abs diff {max_abs:.3g} (allowed {atol:.3g}), min cosine {min_cos:.8f} "
            f"(required {cos_required})"
        )
    return figures
