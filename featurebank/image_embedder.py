"""``ImageEmbedder``: a scikit-learn transformer from images to vectors.

>>> from sklearn.pipeline import make_pipeline                    # doctest: +SKIP
>>> from featurebank.classifiers import LinearProbe               # doctest: +SKIP
>>> clf = make_pipeline(ImageEmbedder("lite0.onnx"), LinearProbe())  # doctest: +SKIP
>>> clf.fit(train_paths, train_labels).score(test_paths, test_labels)  # doctest: +SKIP

The onnxruntime session opens lazily on first use and is dropped when pickled (sessions
cannot be pickled; a copy sent to another process opens its own).

Images are decoded with :data:`~featurebank.artifact.DEFAULT_DECODE_MODE` (``"fast"``) unless
told otherwise, as :func:`~featurebank.embed_into_store.embed_images`, the CLI and the service
do, so the same model gives the same vectors (and the same store space) everywhere. With a
``store`` it is a join of the embedder and the store (it reads and fills the store through
:func:`~featurebank.embed_into_store.embed_images`), which is why it lives here and not in
the embedder room.
"""

from __future__ import annotations

import os
from contextlib import closing
from typing import Any, Sequence

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from featurebank.artifact import DEFAULT_DECODE_MODE
from featurebank.embed_into_store import embed_images
from featurebank.embedder.batches import decode_ahead, infer_batch
from featurebank.embedder.session import ModelRunner, open_model
from featurebank.embedder.sources import ImageList
from featurebank.embedder.tuning import PipelineSettings, tune_for_run, tune_pipeline
from featurebank.errors import ImageDecodeError

__all__ = ["ImageEmbedder"]


class ImageEmbedder(TransformerMixin, BaseEstimator):
    """Embed images with a featurebank ONNX model.

    Parameters
    ----------
    model : str, path of a featurebank ONNX model
    output : str or None, output name or layer (None: the model's only output)
    decode_mode : ``"fast"`` (the default, as everywhere in featurebank) or ``"exact"``
        (pixel-identical to timm's eval transform); part of the store's cache key. The
        default used to be ``"exact"``, a different vector space (and store space) from
        ``embed_images``; pass ``decode_mode="exact"`` to keep the old vectors
    batch_size : int or None, images per inference batch; None (the default): chosen with
        the thread split by measurement for this machine and model, as
        :func:`~featurebank.embed_into_store.embed_images` does
        (:func:`~featurebank.embedder.tuning.tune_pipeline`)
    device : ``"auto"``, ``"cpu"`` or ``"cuda"``
    store : str or None, an embedding store directory; when given, images passed as file
        paths are read from / written to it (content-addressed), others are embedded directly

    Input ``X`` of ``transform``: a sequence of n images, each a file path, encoded bytes,
    a ``PIL.Image`` or an HxW / HxWx3 uint8 array. Output: ndarray of shape (n, dim), float32.
    An image that cannot be decoded raises :class:`~featurebank.errors.ImageDecodeError`.
    """

    def __init__(self, model: str | os.PathLike[str] = "model.onnx", *, output: str | None = None,
                 decode_mode: str = DEFAULT_DECODE_MODE, batch_size: int | None = None, device: str = "auto", store: str | None = None):
        self.model = model
        self.output = output
        self.decode_mode = decode_mode
        self.batch_size = batch_size
        self.device = device
        self.store = store

    def _tuning(self) -> dict[str, Any]:
        return {"device": self.device, "decode_mode": self.decode_mode, "batch_size": self.batch_size,
                "threads": None, "workers": None, "progress": False}

    # sessions are heavy and unpicklable: opened on first use, never pickled (nor the settings
    # chosen for this machine)
    def _runner(self) -> ModelRunner:
        runner = getattr(self, "_runner_", None)
        if runner is None or runner.path != os.fspath(self.model):
            self._settings_ = tune_pipeline(self.model, measure=False, **self._tuning())
            runner = open_model(self.model, device=self.device, threads=self._settings_.threads)
            self._runner_ = runner
        return runner

    def _run_settings(self, n_images: int) -> tuple[ModelRunner, PipelineSettings]:
        runner, settings = tune_for_run(self.model, self._runner(), self._settings_, n_images, **self._tuning())
        self._runner_, self._settings_ = runner, settings
        return runner, settings

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_runner_", None)
        state.pop("_settings_", None)
        return state

    def fit(self, X: Sequence[Any] | None = None, y: Any = None) -> "ImageEmbedder":
        """Open the model and record its output; no learning happens."""
        runner = self._runner()
        out = runner.card.output(self.output)
        self.output_name_ = out.name
        self.n_features_out_ = out.dim
        self.fingerprint_ = out.fingerprint
        return self

    def transform(self, X: Sequence[Any]) -> np.ndarray:
        check_is_fitted(self, "output_name_")
        if isinstance(X, (str, bytes, os.PathLike)):
            raise ValueError("X must be a sequence of images; wrap a single image in a list")
        items = list(X)
        if all(isinstance(x, (str, os.PathLike)) for x in items) and self.store is not None and items:
            images = ImageList(paths=[os.path.abspath(os.fspath(p)) for p in items], labels=[None] * len(items))
            runner, settings = self._run_settings(len(items))
            emb = embed_images(images, runner, store=self.store, decode_mode=self.decode_mode,
                               batch_size=settings.batch_size, workers=settings.workers, progress=False)
            if not emb.ok.all():
                bad = [p for p, ok in zip(emb.paths, emb.ok) if not ok]
                raise ImageDecodeError(f"{len(bad)} image(s) could not be embedded, first: {bad[0]} "
                                       "(see `featurebank store failures`)")
            return emb.vectors[self.output_name_]
        runner, settings = self._run_settings(len(items))
        out = np.empty((len(items), self.n_features_out_), np.float32)
        size = settings.batch_size
        chunks = (items[start : start + size] for start in range(0, len(items), size))
        ahead = decode_ahead(chunks, runner.card, mode=self.decode_mode, workers=settings.workers,
                             lower_priority=settings.lower_priority and not runner.on_cuda)
        with closing(ahead):  # on an error, the decode threads finish before it propagates
            for start, decoded in zip(range(0, len(items), size), ahead):
                if decoded.failures:
                    raise decoded.failures[0][1]
                vecs = infer_batch(runner, decoded.pixels, [self.output_name_])[self.output_name_]
                out[start : start + len(vecs)] = vecs
        return out

    def get_feature_names_out(self, input_features: Any = None) -> np.ndarray:
        check_is_fitted(self, "output_name_")
        return np.asarray([f"{self.output_name_}{i}" for i in range(self.n_features_out_)], dtype=object)

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.two_d_array = False
        tags.requires_fit = True
        tags.non_deterministic = False
        return tags
