"""What the HTTP layer calls: embed, classify and search images, with limits and a cache.

:class:`ServiceEngine` owns the model session, the decode thread pool, the
:class:`~featurebank.service.batching.Batcher`, the content-hash LRU cache, and optionally a
classifier and a similarity index. It knows nothing about HTTP; it raises
:class:`RequestRejected` carrying the status code the HTTP layer should answer with.

Flow of one image: sha256 of its bytes (decode pool) -> cache hit: done. Miss: decode and
preprocess (decode pool) -> batcher -> model -> cache.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
import os
import threading
from collections import OrderedDict, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from featurebank.artifact import VectorSpace, resolve_space
from featurebank.embedder.batches import decode_batch, infer_batch, lower_thread_priority
from featurebank.embedder.session import ModelRunner, open_model
from featurebank.errors import FingerprintMismatchError, ImageTooLargeError, UnknownIdError
from featurebank.service.batching import Batcher
from featurebank.service.config import ServiceConfig
from featurebank.service.metrics import Metrics

__all__ = ["ServiceEngine", "RequestRejected", "EmbedResult", "THUMBNAIL_SIZE"]

log = logging.getLogger("featurebank.service")

#: Longest side of the thumbnails served for indexed images, in pixels.
THUMBNAIL_SIZE = 256


class RequestRejected(Exception):
    """A request the service refuses: ``status`` is the HTTP status code to answer with."""

    def __init__(self, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.headers = status, detail, headers or {}


@dataclass(frozen=True)
class EmbedResult:
    """Vectors of the images of one request, in request order.

    keys : sha256 hex of each image's bytes (the store's content keys)
    vectors : ndarray of shape (n, dim), float32
    cached : ndarray of shape (n,), bool; True where the vector came from the cache
    """

    keys: list[str]
    vectors: np.ndarray
    cached: np.ndarray


class _LRU:
    """Thread-safe LRU map content key -> vector (read-only float32 (dim,))."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._data: OrderedDict[str, np.ndarray] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> np.ndarray | None:
        with self._lock:
            vec = self._data.get(key)
            if vec is not None:
                self._data.move_to_end(key)
            return vec

    def put(self, key: str, vec: np.ndarray) -> None:
        if self.capacity == 0:
            return
        vec = np.array(vec, dtype=np.float32)  # own copy: a batch row would keep the batch alive
        vec.flags.writeable = False
        with self._lock:
            self._data[key] = vec
            self._data.move_to_end(key)
            while len(self._data) > self.capacity:
                self._data.popitem(last=False)

    def __len__(self) -> int:
        return len(self._data)


def _printable(path: str) -> str:
    """A path as valid UTF-8 text: bytes of a name that is not UTF-8 (kept by the store as
    surrogate escapes) are shown as ``\\xe9``, so a JSON answer never fails on them."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def _display_names(paths: dict[str, str]) -> dict[str, str]:
    """key -> file name relative to the deepest folder holding every file (what clients see:
    the server's own folder layout above it is not theirs to know)."""
    if not paths:
        return {}
    try:
        root = os.path.commonpath([os.path.dirname(p) for p in paths.values()])
    except ValueError:  # absolute and relative paths mixed
        root = None
    return {k: _printable(os.path.relpath(p, root) if root else os.path.basename(p)) for k, p in paths.items()}


def _too_many_pixels(where: str, exc: ImageTooLargeError) -> str:
    """The 413 answer to an image over ``max_pixels``: the decoder's facts, the server's option."""
    size = f" ({exc.size[0]}x{exc.size[1]})" if exc.size else ""
    count = f"{exc.pixels:,} pixels{size}" if exc.pixels is not None else "too many pixels"
    return (f"{where}: image has {count}, over the limit of {exc.max_pixels:,} (possible decompression bomb); "
            "if you trust the file, pass a larger max_pixels (server: --max-pixels)")


class _PixelBudget:
    """A weighted FIFO semaphore on the event loop: pixels being decoded at once, across requests.

    A request waits its turn rather than overtaking a larger one (no starvation); ``acquire``
    of more than ``capacity`` is the caller's mistake (it clamps first).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._waiters: deque[tuple[int, asyncio.Future]] = deque()

    async def acquire(self, n: int) -> None:
        if not self._waiters and self.used + n <= self.capacity:
            self.used += n
            return
        future = asyncio.get_running_loop().create_future()
        self._waiters.append((n, future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():  # granted as the waiter was cancelled
                self.release(n)
            raise

    def release(self, n: int) -> None:
        self.used -= n
        while self._waiters:
            want, future = self._waiters[0]
            if future.done():  # cancelled waiter
                self._waiters.popleft()
                continue
            if self.used + want > self.capacity:
                break
            self._waiters.popleft()
            self.used += want
            future.set_result(None)


class ServiceEngine:
    """Embedding, classification and search for the service, shared by all requests.

    Parameters
    ----------
    model : path of a featurebank ONNX model, or an open ``ModelRunner``
    classifier : path of a classifier file (``save_classifier``), a ``SavedClassifier``, or None:
        then a model that classifies by itself (a fused or fine-tuned model, whose card lists
        ``classes``) classifies with its own ``probabilities`` output
    index : directory of a similarity index (``featurebank index build``), a
        ``SimilarityIndex``, or None
    config : :class:`ServiceConfig`

    The classifier and the index must come from this model's vectors: their recorded
    vector-space fingerprint picks the output and the decode mode; a mismatch raises
    :class:`~featurebank.errors.FingerprintMismatchError` at start, not wrong answers later.
    """

    def __init__(self, model: str | os.PathLike[str] | ModelRunner, *, classifier: Any = None, index: Any = None,
                 config: ServiceConfig | None = None) -> None:
        self.config = config = config or ServiceConfig()
        self.runner = model if isinstance(model, ModelRunner) else open_model(model, device=config.device, threads=config.threads)
        card = self.runner.card
        if config.output is None and len(card.outputs) > 1 and classifier is None and index is None \
                and not card.classifies:
            names = ", ".join(o.name for o in card.outputs)
            raise ValueError(f"the model has {len(card.outputs)} outputs ({names}); choose one with output=NAME (--output)")
        self.classifier = self._load_classifier(classifier)
        self.index = self._load_index(index)
        chosen = self._resolve_space()
        self.output, self.decode_mode, self.space = chosen.output, chosen.decode_mode, chosen.fingerprint
        for what, dim in (("classifier", getattr(self.classifier and self.classifier.estimator, "n_features_in_", None)),
                          ("index", self.index.dim if self.index is not None else None)):
            if dim is not None and int(dim) != self.output.dim:
                raise FingerprintMismatchError(
                    f"the {what} takes {dim}-dimensional vectors but output {self.output.name!r} of the model gives "
                    f"{self.output.dim}; serve it with the model it was built from"
                )
        self.paths = self._index_paths()  # absolute, for thumbnails; clients see ``names``
        self.names = _display_names(self.paths)
        self.metrics = Metrics(max_batch=config.max_batch)
        self.cache = _LRU(config.cache_size)
        self._thumbs: OrderedDict[str, bytes] = OrderedDict()
        self._thumb_lock = threading.Lock()
        self._admitted = 0
        self._decoding = 0  # images in the decode pool: they may join the batch being formed
        self._decode_budget = _PixelBudget(config.max_request_pixels)
        self._decode_pool: ThreadPoolExecutor | None = None
        self.batcher = Batcher(self._infer, max_batch=config.max_batch, max_wait_s=config.max_wait_ms / 1000.0,
                               metrics=self.metrics, upcoming=lambda: self._decoding)
        self.ready = False
        self.stopping = False

    # ------------------------------------------------------------------ construction helpers

    def _load_classifier(self, classifier: Any):
        if classifier is None and not self.runner.card.classifies:
            return None
        from featurebank.classifiers import SavedClassifier, load_classifier

        if classifier is None:
            from featurebank import __version__
            from featurebank.workflow import ModelClassifier

            # the model's own head (embedding output -> probabilities), recorded on that output
            head = ModelClassifier(self.runner)
            return SavedClassifier(estimator=head, fingerprint=head.output.fingerprint, classes=tuple(head.classes),
                                   n_samples=None, featurebank_version=__version__, format_version=0, created="",
                                   estimator_type="the model's own probabilities output")

        if isinstance(classifier, SavedClassifier):
            return classifier
        # the fingerprint is checked below against every space this model can produce,
        # so that the message can say which output / decode mode would fit
        return load_classifier(classifier)

    def _load_index(self, index: Any):
        if index is None:
            return None
        from featurebank.search import SimilarityIndex, open_index

        return index if isinstance(index, SimilarityIndex) else open_index(index)

    def _resolve_space(self) -> VectorSpace:
        # the classifier and the index may record an output's or a space's fingerprint
        recorded = {"classifier": self.classifier.fingerprint if self.classifier is not None else None,
                    "index": self.index.space if self.index is not None else None}
        return resolve_space(self.runner.card, output=self.config.output, decode_mode=self.config.decode_mode,
                             recorded=recorded)

    def _index_paths(self) -> dict[str, str]:
        if self.index is None:
            return {}
        store_dir = (self.index.source or {}).get("store")
        if not store_dir or not os.path.isdir(store_dir):
            return {}
        from featurebank.search import store_paths

        ids = set(self.index.ids)
        return {k: p for k, p in store_paths(store_dir, ids).items() if k in ids}

    # ------------------------------------------------------------------ life cycle

    async def start(self) -> None:
        # as in the batch embedder: on a CPU-only machine inference is the critical path and
        # decoding fills the gaps at a lower priority
        self._decode_pool = ThreadPoolExecutor(max_workers=self.config.decode_threads, thread_name_prefix="fb-decode",
                                               initializer=None if self.runner.on_cuda else lower_thread_priority)
        await self.batcher.start()

    async def warm_up(self) -> None:
        """Run the model once at batch size 1 and once at ``max_batch`` (onnxruntime plans its
        memory on the first runs), then mark the engine ready."""
        c, h, w = self.runner.card.preprocessing.input_size
        loop = asyncio.get_running_loop()
        for n in sorted({1, self.config.max_batch}):
            await loop.run_in_executor(self._decode_pool, self._infer, np.zeros((n, h, w, c), np.uint8))
        self.ready = True
        log.info("model warmed up; ready")

    async def stop(self) -> None:
        """Finish queued work, then release the threads."""
        self.stopping = True
        self.ready = False
        await self.batcher.stop()
        if self._decode_pool is not None:
            self._decode_pool.shutdown(wait=True)

    # ------------------------------------------------------------------ embedding

    def _infer(self, pixels: np.ndarray) -> np.ndarray:
        return infer_batch(self.runner, pixels, [self.output.name])[self.output.name]

    def _survey(self, data: bytes) -> tuple[str, np.ndarray | None, int | None]:
        """(key, cached vector or None, pixels by the header or None); runs in the decode pool.

        Pillow reads only the header here (``Image.open`` is lazy): nothing is decoded.
        None: the header cannot be read, and decoding will say why.
        """
        key = hashlib.sha256(data).hexdigest()
        vec = self.cache.get(key)
        if vec is not None:
            return key, vec, None
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as img:
                return key, None, img.size[0] * img.size[1]
        except Exception:  # noqa: BLE001 - any header Pillow cannot read is the decoder's to explain
            return key, None, None

    def _decode(self, data: bytes, where: str) -> np.ndarray:
        """Decoded, preprocessed pixels (H, W, C) uint8; runs in the decode pool."""
        decoded = decode_batch([bytes(data)], self.runner.card, mode=self.decode_mode,
                               max_pixels=self.config.max_pixels, names=[where])
        for _, exc in decoded.failures:
            if isinstance(exc, ImageTooLargeError):
                raise RequestRejected(413, _too_many_pixels(where, exc)) from None
            raise RequestRejected(422, str(exc)) from None
        self.metrics.stage.labels(stage="decode").observe(decoded.seconds)
        return decoded.pixels[0]

    async def embed(self, images: Sequence[bytes], names: Sequence[str] | None = None) -> EmbedResult:
        """Embed the encoded images of one request.

        Parameters
        ----------
        images : encoded image files (JPEG, PNG, WebP, ...), as bytes
        names : how to call each image in error messages (default ``image 0``, ``image 1`` ...)

        Returns
        -------
        EmbedResult with vectors of shape (len(images), dim), float32

        Raises
        ------
        RequestRejected
            400 no image; 413 too many images or pixels; 422 undecodable image;
            503 queue full (``Retry-After``); 504 not answered within ``timeout_s``.
        """
        config = self.config
        n = len(images)
        if n == 0:
            raise RequestRejected(400, "no image in the request: send image bytes as the body (Content-Type: image/*) "
                                       "or as multipart/form-data files")
        if n > config.max_images:
            raise RequestRejected(413, f"{n} images in one request; the limit is {config.max_images} (split the request)")
        if self.stopping:
            raise RequestRejected(503, "the service is shutting down", {"Retry-After": "1"})
        if self._admitted + n > config.queue_size:
            self.metrics.rejected.inc()
            raise RequestRejected(
                503, f"the service is busy ({self._admitted} images queued, limit {config.queue_size}); retry shortly",
                {"Retry-After": str(self._retry_after())},
            )
        names = list(names) if names is not None else [f"image {i}" for i in range(n)]
        self._admitted += n
        self.metrics.queue_depth.set(self._admitted)
        try:
            async with asyncio.timeout(config.timeout_s):
                results = await self._gather(images, names)
        except TimeoutError:
            raise RequestRejected(504, f"not answered within {config.timeout_s:g} s (server --timeout-s); "
                                       "the service is overloaded or the images are very large") from None
        finally:
            self._admitted -= n
            self.metrics.queue_depth.set(self._admitted)
        keys = [r[0] for r in results]
        vectors = np.stack([r[1] for r in results]).astype(np.float32, copy=False)
        cached = np.array([r[2] for r in results], dtype=bool)
        return EmbedResult(keys, vectors, cached)

    async def _gather(self, images: Sequence[bytes], names: Sequence[str]) -> list[tuple[str, np.ndarray, bool]]:
        loop = asyncio.get_running_loop()
        # every image of the request counts as on its way to the batcher until its decode is
        # over, so that a batch being formed waits for it (Batcher's ``upcoming``)
        upcoming = [True] * len(images)
        self._decoding += len(images)

        def arrived(i: int) -> None:
            if upcoming[i]:
                upcoming[i] = False
                self._decoding -= 1

        try:
            surveys = await asyncio.gather(*(loop.run_in_executor(self._decode_pool, self._survey, d) for d in images))
            self._check_request_pixels(surveys)
            # a TaskGroup cancels the request's other images as soon as one fails
            try:
                async with asyncio.TaskGroup() as group:
                    tasks = [group.create_task(self._embed_one(data, name, survey, lambda i=i: arrived(i)))
                             for i, (data, name, survey) in enumerate(zip(images, names, surveys))]
            except BaseExceptionGroup as group_exc:
                errors = group_exc.exceptions
                rejected = [e for e in errors if isinstance(e, RequestRejected)]
                raise (rejected[0] if rejected else errors[0]) from None
        finally:
            for i in range(len(images)):
                arrived(i)
        return [t.result() for t in tasks]

    def _check_request_pixels(self, surveys: Sequence[tuple[str, np.ndarray | None, int | None]]) -> None:
        # images over max_pixels are refused one by one when their header is opened again
        # for decoding, with the per-image message; cached images are not decoded at all
        config = self.config
        counts = [p for _, vec, p in surveys if vec is None and p is not None and p <= config.max_pixels]
        total, budget = sum(counts), config.max_request_pixels
        if total > budget:
            raise RequestRejected(
                413, f"the {len(counts)} images of this request have {total:,} pixels in all, over the per-request "
                     f"budget of {budget:,} (server --max-request-pixels); split them into requests of at most "
                     f"{budget:,} pixels each (at least {-(-total // budget)} requests)")

    def _retry_after(self) -> int:
        # seconds to clear the queue at the observed rate, at least 1
        batches = self.metrics.sample("featurebank_stage_duration_seconds_count", stage="infer")
        if not batches:
            return 1
        per_batch = self.metrics.sample("featurebank_stage_duration_seconds_sum", stage="infer") / batches
        return max(1, int(np.ceil(self._admitted / self.config.max_batch * per_batch)))

    async def _embed_one(self, data: bytes, where: str, survey: tuple[str, np.ndarray | None, int | None],
                         arrived: Callable[[], None]) -> tuple[str, np.ndarray, bool]:
        key, vec, pixels = survey
        if vec is not None:
            arrived()
            self.metrics.cache_hits.inc()
            return key, vec, True
        try:
            pixels = await self._decode_within_budget(data, where, pixels or 0)
        finally:
            arrived()
        self.metrics.cache_misses.inc()
        vec = await self.batcher.embed(pixels)
        self.cache.put(key, vec)
        self.metrics.cache_entries.set(len(self.cache))
        return key, vec, False

    async def _decode_within_budget(self, data: bytes, where: str, pixels: int) -> np.ndarray:
        # the pixels are held from the moment the decode thread may start until it is done,
        # also when the request is cancelled meanwhile (the thread cannot be stopped)
        loop = asyncio.get_running_loop()
        n = min(pixels, self.config.max_request_pixels)
        await self._decode_budget.acquire(n)
        try:
            job = self._decode_pool.submit(self._decode, data, where)
        except BaseException:
            self._decode_budget.release(n)
            raise
        job.add_done_callback(lambda _: loop.call_soon_threadsafe(self._decode_budget.release, n))
        return await asyncio.wrap_future(job)

    # ------------------------------------------------------------------ classify / search

    def classify(self, vectors: np.ndarray) -> list[list[tuple[str, float]]]:
        """(label, probability) pairs per vector, most probable first.

        Estimators without ``predict_proba`` give their predicted label with probability 1.0.
        """
        est = self.require_classifier().estimator
        names = list(self.classifier.classes)
        if hasattr(est, "predict_proba"):
            P = np.asarray(est.predict_proba(vectors), dtype=np.float64)
            order = np.argsort(-P, axis=1, kind="stable")
            return [[(str(names[j]), float(row[j])) for j in idx] for row, idx in zip(P, order)]
        fitted = [str(c) for c in est.classes_]
        return [[(str(names[fitted.index(str(p))]), 1.0)] for p in est.predict(vectors)]

    def require_classifier(self):
        """The loaded classifier; :class:`RequestRejected` 404 where none is loaded."""
        if self.classifier is None:
            raise RequestRejected(404, "no classifier is loaded: start the service with --classifier FILE")
        return self.classifier

    def require_index(self):
        """The loaded similarity index; :class:`RequestRejected` 404 where none is loaded."""
        if self.index is None:
            raise RequestRejected(404, "no similarity index is loaded: start the service with --index DIR")
        return self.index

    def _check_k(self, k: int) -> int:
        if not 1 <= k <= self.config.max_k:
            raise RequestRejected(422, f"k must be between 1 and {self.config.max_k}; got k={k}")
        return k

    def search(self, vectors: np.ndarray, k: int) -> list[list[dict]]:
        """Neighbours of each query vector: dicts with id, score, rank, name and path.

        ``name`` is the indexed file relative to the folder that holds every indexed file
        (None where the store records no file); ``path`` its absolute server path, only with
        ``config.expose_paths``, else None.
        """
        index = self.require_index()
        k = self._check_k(k)
        scores, ids = index.search(vectors, k, clip=True)
        return self._neighbours(scores, ids)

    def search_by_id(self, key: str, k: int) -> list[dict]:
        """Neighbours of an indexed image (itself first)."""
        index = self.require_index()
        k = self._check_k(k)
        try:
            scores, ids = index.search_by_id([key], k, clip=True)
        except UnknownIdError:
            raise RequestRejected(404, f"id {key!r} is not in the index") from None
        return self._neighbours(scores, ids)[0]

    async def vectors_of_id(self, key: str) -> np.ndarray:
        """The stored vector of an indexed image, from the index's store: (1, dim) float32.

        The index itself may hold normalised or compressed vectors; the store has the exact
        ones a classifier was trained on.
        """
        index = self.require_index()
        if key not in index:
            raise RequestRejected(404, f"id {key!r} is not in the index")
        store_dir = (index.source or {}).get("store")
        if not store_dir or not os.path.isdir(store_dir):
            raise RequestRejected(404, "the index records no store, so the vectors of its images are not available")

        def load() -> tuple[np.ndarray, np.ndarray]:
            from featurebank.store import open_store

            with open_store(store_dir, create=False) as store:
                return store.space(index.space or self.space).get([key])

        X, found = await asyncio.get_running_loop().run_in_executor(self._decode_pool, load)
        if not found.all():
            raise RequestRejected(404, f"id {key!r} is in the index but its vector is no longer in the store")
        return X

    def _neighbours(self, scores: np.ndarray, ids: list[list[str | None]]) -> list[list[dict]]:
        expose = self.config.expose_paths
        return [
            [{"id": key, "score": float(s), "rank": rank, "name": self.names.get(key),
              "path": _printable(self.paths[key]) if expose and key in self.paths else None}
             for rank, (key, s) in enumerate(zip(row, srow)) if key is not None]
            for row, srow in zip(ids, scores)
        ]

    async def thumbnail(self, key: str) -> bytes:
        """JPEG thumbnail (longest side ``THUMBNAIL_SIZE``) of an indexed image, by id only."""
        self.require_index()
        path = self.paths.get(key)
        if path is None:
            known = key in self.index
            raise RequestRejected(404, f"id {key!r} is in the index but the store records no file for it" if known
                                  else f"id {key!r} is not in the index")
        with self._thumb_lock:
            if key in self._thumbs:
                self._thumbs.move_to_end(key)
                return self._thumbs[key]
        data = await asyncio.get_running_loop().run_in_executor(self._decode_pool, self._make_thumbnail, path)
        with self._thumb_lock:
            self._thumbs[key] = data
            while len(self._thumbs) > 256:
                self._thumbs.popitem(last=False)
        return data

    def _make_thumbnail(self, path: str) -> bytes:
        from PIL import Image

        from featurebank.decoding.decode import thumbnail

        try:
            img = thumbnail(path, THUMBNAIL_SIZE, max_pixels=self.config.max_pixels)
        except ImageTooLargeError:
            raise RequestRejected(413, "the indexed image is over the pixel limit") from None
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            raise RequestRejected(404, f"the indexed image file can no longer be read ({type(exc).__name__})") from None
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        return buf.getvalue()

    # ------------------------------------------------------------------ description

    def info(self) -> dict:
        """What is served: model, output, decode mode, classifier classes, index size."""
        card = self.runner.card
        return {
            "model": {"backbone": card.backbone, "fingerprint": card.fingerprint, "provider": self.runner.provider,
                      "path": Path(self.runner.path).name},
            "output": {"name": self.output.name, "layer": self.output.layer, "dim": self.output.dim,
                       "fingerprint": self.output.fingerprint},
            "decode_mode": self.decode_mode,
            "space": self.space,
            "classifier": None if self.classifier is None else {
                "classes": [str(c) for c in self.classifier.classes], "estimator": self.classifier.estimator_type},
            "index": None if self.index is None else {
                "count": self.index.count, "metric": self.index.metric, "factory": self.index.factory,
                "with_files": len(self.paths)},
            "limits": {k: v for k, v in self.config.public_dict().items()
                       if k in ("max_batch", "max_wait_ms", "queue_size", "max_images", "max_body_mb", "max_pixels",
                                "max_request_pixels", "timeout_s", "header_timeout_s", "body_timeout_s",
                                "max_connections", "top_k", "max_k")},
            "auth": self.config.api_key is not None,
        }
