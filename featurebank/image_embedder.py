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
from typing import Any, Sequence

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.utils.validation import check_is_fitted

from featurebank.artifact import DEFAULT_DECODE_MODE
from featurebank.embed_into_store import embed_images
from featurebank.embedder.batches import decode_batch, infer_batch
from featurebank.embedder.session import ModelRunner, open_model
from featurebank.embedder.sources import ImageList
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
    batch_size : int, images per inference batch
    device : ``"auto"``, ``"cpu"`` or ``"cuda"``
    store : str or None, an embedding store directory; when given, images passed as file
        paths are read from / written to it (content-addressed), others are embedded directly

    Input ``X`` of ``transform``: a sequence of n images, each a file path, encoded bytes,
    a ``PIL.Image`` or an HxW / HxWx3 uint8 array. Output: ndarray of shape (n, dim), float32.
    An image that cannot be decoded raises :class:`~featurebank.errors.ImageDecodeError`.
    """

    def __init__(self, model: str | os.PathLike[str] = "model.onnx", *, output: str | None = None,
                 decode_mode: str = DEFAULT_DECODE_MODE, batch_size: int = 32, device: str = "auto", store: str | None = None):
        self.model = model
        self.output = output
        self.decode_mode = decode_mode
        self.batch_size = batch_size
        self.device = device
        self.store = store

    # sessions are heavy and unpicklable: opened on first use, never pickled
    def _runner(self) -> ModelRunner:
        runner = getattr(self, "_runner_", None)
        if runner is None or runner.path != os.fspath(self.model):
            runner = open_model(self.model, device=self.device)
            self._runner_ = runner
        return runner

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.pop("_runner_", None)
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
            emb = embed_images(images, self._runner(), store=self.store, decode_mode=self.decode_mode,
                               batch_size=self.batch_size, progress=False)
            if not emb.ok.all():
                bad = [p for p, ok in zip(emb.paths, emb.ok) if not ok]
                raise ImageDecodeError(f"{len(bad)} image(s) could not be embedded, first: {bad[0]} "
                                       "(see `featurebank store failures`)")
            return emb.vectors[self.output_name_]
        runner = self._runner()
        out = np.empty((len(items), self.n_features_out_), np.float32)
        for start in range(0, len(items), self.batch_size):
            chunk = items[start : start + self.batch_size]
            decoded = decode_batch(chunk, runner.card, mode=self.decode_mode)
            if decoded.failures:
                raise decoded.failures[0][1]
            vecs = infer_batch(runner, decoded.pixels, [self.output_name_])[self.output_name_]
            out[start : start + len(chunk)] = vecs
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
