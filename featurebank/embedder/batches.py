"""Batches of images to batches of vectors: the one decode -> infer pair every loop calls.

* :func:`decode_batch` decodes and preprocesses a batch of images (paths, bytes, ...) into
  one uint8 array, one row per image, and reports the images that failed instead of raising;
* :func:`infer_batch` runs the model on such an array and returns one ``(n, dim)`` float32
  array per model output;
* :func:`decode_ahead` keeps a thread pool decoding a bounded number of batches ahead of the
  caller, so decoding overlaps inference and memory stays flat whatever the dataset size.

The embed-into-store job (:mod:`featurebank.embed_into_store`), the scikit-learn transformer
(:mod:`featurebank.image_embedder`), the service and the Ray workers all call these two functions (Ray decodes in tasks and infers in actors,
which is why they are two).

>>> decoded = decode_batch(["a.jpg", "b.png"], runner.card, mode="fast")   # doctest: +SKIP
>>> vectors = infer_batch(runner, decoded.pixels[decoded.ok])                # doctest: +SKIP
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from featurebank.artifact import ModelCard, Preprocessing
from featurebank.decoding import DEFAULT_MAX_PIXELS, decode_image, to_model_input
from featurebank.embedder.session import ModelRunner, physical_cores
from featurebank.errors import FeaturebankError, ImageDecodeError

__all__ = ["DecodedBatch", "decode_ahead", "decode_batch", "infer_batch", "lower_thread_priority"]


@dataclass
class DecodedBatch:
    """A decoded batch, aligned with the sources it was made from.

    Attributes
    ----------
    pixels : ndarray of shape (n, H, W, C), uint8; rows of failed images are 0
    ok : ndarray of shape (n,), bool; False where the image failed
    failures : list of (index, error), the error a :class:`~featurebank.errors.FeaturebankError`
        (usually :class:`~featurebank.errors.ImageDecodeError`) whose message names the image
    seconds : wall time spent decoding the batch
    """

    pixels: np.ndarray
    ok: np.ndarray
    failures: list[tuple[int, FeaturebankError]]
    seconds: float

    @property
    def decoded(self) -> np.ndarray:
        """The pixels of the images that decoded, ``(n_ok, H, W, C)`` uint8 (no copy when all did)."""
        return self.pixels if not self.failures else self.pixels[self.ok]


def decode_batch(
    sources: Sequence[Any],
    pre: Preprocessing | ModelCard,
    *,
    mode: str,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    names: Sequence[str | None] | None = None,
    read: Callable[[Any], Any] | None = None,
) -> DecodedBatch:
    """Decode and preprocess a batch of images; an image that fails is reported, not raised.

    Parameters
    ----------
    sources : n images, each anything :func:`~featurebank.decoding.decode_image` takes (a
        path, encoded bytes, a ``PIL.Image``, a uint8 array), or anything ``read`` turns into one
    pre : the model card (or its :class:`~featurebank.artifact.Preprocessing`)
    mode : ``"fast"`` or ``"exact"`` (see :func:`~featurebank.decoding.decode_image`)
    max_pixels : refuse images with more pixels than this, before decoding them
    names : what messages call each image that is not a path (a URL, a request's file name)
    read : function ``source -> image`` called for each source just before it is decoded, on
        the calling thread (e.g. download a URL, so that only one image is held at a time); a
        :class:`~featurebank.errors.FeaturebankError` or ``OSError`` it raises is that
        image's failure

    Returns
    -------
    DecodedBatch with ``pixels`` of shape (n, H, W, C), uint8, where (C, H, W) is the card's
    ``input_size``.
    """
    t0 = time.perf_counter()
    if isinstance(pre, ModelCard):
        pre = pre.preprocessing
    n = len(sources)
    if names is not None and len(names) != n:
        raise ValueError(f"names must give one name per source ({n}); got {len(names)}")
    c, h, w = pre.input_size
    pixels = np.empty((n, h, w, c), np.uint8)
    ok = np.ones(n, bool)
    failures: list[tuple[int, FeaturebankError]] = []
    for i, src in enumerate(sources):
        name = names[i] if names is not None else None
        try:
            image = read(src) if read is not None else src
            decode_image(image, pre, mode=mode, max_pixels=max_pixels, out=pixels[i], name=name)
        except (FeaturebankError, OSError) as exc:
            pixels[i] = 0
            ok[i] = False
            failures.append((i, exc if isinstance(exc, FeaturebankError) else _os_failure(exc, name or src)))
    return DecodedBatch(pixels, ok, failures, time.perf_counter() - t0)


def _os_failure(exc: OSError, src: Any) -> ImageDecodeError:
    # a file that vanished or became unreadable after it was listed; the message names it once
    reason = f"{exc.strerror or exc}"
    if not isinstance(src, (str, os.PathLike)):
        return ImageDecodeError(reason)
    where = os.fspath(src)
    text = str(exc)
    return ImageDecodeError(text if text.startswith(f"{where}: ") else f"{where}: {reason}")


def infer_batch(runner: ModelRunner, pixels: np.ndarray, outputs: Sequence[str] | None = None) -> dict[str, np.ndarray]:
    """Run the model on a decoded batch.

    Parameters
    ----------
    runner : an open :class:`~featurebank.embedder.session.ModelRunner`
    pixels : ndarray of shape (n, H, W, C), uint8, as :func:`decode_batch` makes
    outputs : output names to compute (default: all of the model's outputs)

    Returns
    -------
    dict output name -> ndarray of shape (n, dim), float32
    """
    names = list(outputs) if outputs is not None else [o.name for o in runner.card.outputs]
    n = len(pixels)
    if n == 0:  # onnxruntime rejects an empty batch on some providers; nothing to compute
        return {name: np.zeros((0, runner.card.output(name).dim), np.float32) for name in names}
    outs = runner.run(to_model_input(pixels, runner.card), names)
    return {name: vecs.reshape(n, -1) for name, vecs in outs.items()}


def lower_thread_priority() -> None:
    """Decode-thread initializer on CPU-only runs: onnxruntime's threads are the critical
    path and share the cores with decoding; at a lower priority decoding fills the gaps
    (op barriers, waits) instead of preempting inference. +5% images/s measured on 2 cores
    (benchmarks/RESULTS.md). Linux only; elsewhere threads keep the default priority."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 10)
    except (AttributeError, OSError):  # not Linux, or not permitted: speed only, never results
        pass


def decode_ahead(
    batches: Iterable[Sequence[Any]],
    pre: Preprocessing | ModelCard,
    *,
    mode: str,
    workers: int | None = None,
    lower_priority: bool = True,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> Iterator[DecodedBatch]:
    """:func:`decode_batch` of each batch, in order, decoded on a thread pool a bounded number
    of batches ahead of the caller (Pillow releases the GIL, so decoding overlaps inference).

    Parameters
    ----------
    batches : iterable of batches of sources (consumed lazily, as decoding gets ahead)
    workers : decode threads (default: the physical cores); ``max(2, workers + 1)`` batches
        are decoding or decoded-and-waiting at any time
    lower_priority : run the decode threads at a lower priority (:func:`lower_thread_priority`);
        right when inference runs on the same CPUs, not when it runs on a GPU
    """
    n_workers = workers or physical_cores()
    init = lower_thread_priority if lower_priority else None
    with ThreadPoolExecutor(max_workers=n_workers, thread_name_prefix="fb-decode", initializer=init) as pool:
        pending: deque[Future] = deque()
        it = iter(batches)
        ahead = max(2, n_workers + 1)  # bounded: memory stays flat
        for b in it:
            pending.append(pool.submit(decode_batch, b, pre, mode=mode, max_pixels=max_pixels))
            if len(pending) >= ahead:
                break
        while pending:
            got = pending.popleft().result()
            for b in it:  # the next batch starts decoding before this one is handed over
                pending.append(pool.submit(decode_batch, b, pre, mode=mode, max_pixels=max_pixels))
                break
            yield got
