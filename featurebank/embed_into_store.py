"""Embedding into a store: folders of images to vectors, cached content-addressed.

The join of the embedder (batches of images to batches of vectors) and the store (what to
skip, where to write). Stages (clip-retrieval's reader -> mapper -> writer, each timed on its
own):

* **read**: list the inputs (:func:`~featurebank.embedder.sources.list_images`), hash each
  file's bytes (the store keeps a stat cache so unchanged files are not re-read), and drop
  what the store already holds for this model and decode mode (:func:`plan_work`);
* **decode**: :func:`~featurebank.embedder.batches.decode_ahead` decodes and preprocesses
  images to uint8 on a thread pool (Pillow releases the GIL), a bounded number of batches
  ahead, so decoding overlaps inference and memory stays flat whatever the dataset size;
* **infer**: :func:`~featurebank.embedder.batches.infer_batch` runs each batch on one
  onnxruntime session (CUDA with IO binding when present);
* **write**: each batch goes into the store as one atomic shard, on a writer thread while the
  next batch infers, so a killed run loses at most the batches in flight (up to three) and a
  re-run redoes only what is missing.

Without a store the same stages run and the vectors stay in memory.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

from featurebank.artifact import DEFAULT_DECODE_MODE, check_decode_mode, space_fingerprint
from featurebank.embedder.batches import decode_ahead, infer_batch
from featurebank.embedder.session import ModelRunner, open_model
from featurebank.embedder.sources import ImageList, list_images
from featurebank.embedder.tuning import tune_for_run, tune_pipeline
from featurebank.errors import FeaturebankError

__all__ = ["embed_images", "load_embeddings", "load_activations", "EmbedReport", "Embeddings", "space_of", "open_spaces", "plan_work",
           "WorkPlan"]

log = logging.getLogger("featurebank")

# batches whose vectors are being written (or wait to be) while the next batch infers
_WRITES_IN_FLIGHT = 2


@dataclass
class EmbedReport:
    """What a run did. ``timings`` holds seconds per stage (read, decode, infer, write).
    ``damaged``: cached vectors that failed their checksum, so were embedded again;
    ``quarantined``: the shards that held them, moved to ``<store>/quarantine/``.
    ``settings``: the batch size, onnxruntime threads and decode threads the run used, and
    where they came from (:class:`~featurebank.embedder.tuning.PipelineSettings`)."""

    total: int = 0
    embedded: int = 0
    cached: int = 0
    duplicates: int = 0
    failed: int = 0
    skipped_failed: int = 0
    damaged: int = 0
    quarantined: list[str] = field(default_factory=list)
    elapsed: float = 0.0
    timings: dict[str, float] = field(default_factory=dict)
    failures: list[tuple[str, str]] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_s(self) -> float:
        return self.embedded / self.elapsed if self.elapsed > 0 else 0.0

    def summary(self) -> str:
        parts = [
            f"{self.total} images: {self.embedded} embedded, {self.cached} from cache",
            f"{self.duplicates} duplicate files" if self.duplicates else "",
            f"{self.failed} failed",
            f"{self.skipped_failed} failed before, skipped (--retry-failed to try again)" if self.skipped_failed else "",
            (f"{self.damaged} cached vectors failed their checksum and were embedded again "
             f"({len(self.quarantined)} damaged shards moved to quarantine)") if self.quarantined else "",
            f"{self.elapsed:.1f}s" + (f" ({self.images_per_s:.1f} images/s)" if self.embedded else ""),
        ]
        return ", ".join(p for p in parts if p)


@dataclass
class Embeddings:
    """Vectors for a list of images, in input order.

    Attributes
    ----------
    paths : list of str, length n
    labels : list of (str or None), length n
    keys : list of str, content keys (sha256 of the file bytes; "" where unreadable)
    ok : ndarray of shape (n,), bool; False where the image failed
    vectors : dict output name -> ndarray of shape (n, dim), float32 (rows of failed images are 0)
    report : :class:`EmbedReport`
    """

    paths: list[str]
    labels: list[str | None]
    keys: list[str]
    ok: np.ndarray
    vectors: dict[str, np.ndarray]
    report: EmbedReport

    @property
    def X(self) -> np.ndarray:
        """The vectors of the only output, ``(n, dim)`` float32."""
        if len(self.vectors) != 1:
            raise ValueError(f"model has {len(self.vectors)} outputs ({', '.join(self.vectors)}); use .vectors[name]")
        return next(iter(self.vectors.values()))


def space_of(runner: ModelRunner, output: str, decode_mode: str) -> str:
    """The store space id of one model output under one decode mode."""
    return space_fingerprint(runner.card.output(output).fingerprint, decode_mode)


def _progress(total: int, enabled: bool, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, unit="img", desc=desc, disable=not enabled, file=sys.stderr, smoothing=0.1, dynamic_ncols=True)


def _as_runner(model: str | os.PathLike[str] | ModelRunner, device: str, threads: int | None) -> ModelRunner:
    return model if isinstance(model, ModelRunner) else open_model(model, device=device, threads=threads)


def embed_images(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | ImageList,
    model: str | os.PathLike[str] | ModelRunner,
    *,
    store: Any = None,
    decode_mode: str = DEFAULT_DECODE_MODE,
    batch_size: int | None = None,
    workers: int | None = None,
    device: str = "auto",
    threads: int | None = None,
    retry_failed: bool = False,
    return_vectors: bool = True,
    progress: bool | None = None,
    store_dtype: str | None = None,
    repair: bool = True,
) -> Embeddings:
    """Embed images with a featurebank ONNX model, reusing and filling a store.

    Parameters
    ----------
    source : folder (recursive; class subfolders give labels), .txt/.csv/.parquet list of
        paths, a list of those, or an :class:`ImageList`
    model : path of a featurebank ONNX model, or an open :class:`ModelRunner`
    store : a store directory or an open store; None keeps vectors in memory only
    decode_mode : ``"fast"`` (reduced-size JPEG decoding) or ``"exact"`` (the torch
        reference preprocessing); part of the cache key
    batch_size : images per inference batch and per store shard
    workers : decode threads
    threads : onnxruntime intra-op threads (only with a model path: an open ``ModelRunner``
        keeps its own)
    device : ``auto``, ``cpu`` or ``cuda``
    retry_failed : decode again the images a previous run recorded as failed
    return_vectors : load the vectors of every input into ``Embeddings.vectors``
    progress : show a progress bar (default: when stderr is a terminal)
    store_dtype : ``"float32"`` or ``"float16"`` (half the disk; vectors load as float32) for a
        new space; None keeps an existing space's dtype (float32 for a new one)
    repair : cached vectors of these images whose shard batch fails its checksum are treated
        as missing: the shard is quarantined (its intact batches kept) and the images are
        embedded again. False raises StoreError instead when such vectors are read.

    ``batch_size``, ``workers`` and ``threads`` left at None are chosen by measurement for
    this machine and model (:func:`~featurebank.embedder.tuning.tune_pipeline`: measured
    once, a few seconds, and cached beside the model, by the first run with at least
    ``MEASURE_MIN_IMAGES`` (256) images to embed; before that: batch 16 and every core for
    onnxruntime and for decoding); the ones given win.

    Returns
    -------
    Embeddings
    """
    check_decode_mode(decode_mode)
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1):
        raise ValueError(f"batch_size must be a positive integer; got batch_size={batch_size!r}")
    if progress is None:
        progress = sys.stderr.isatty()
    t_start = time.perf_counter()
    report = EmbedReport()
    timings = {"read": 0.0, "decode": 0.0, "infer": 0.0, "write": 0.0}

    images = source if isinstance(source, ImageList) else list_images(source)
    explicit = {"device": device, "decode_mode": decode_mode, "batch_size": batch_size, "workers": workers,
                "threads": None if isinstance(model, ModelRunner) else threads, "progress": progress}
    settings = tune_pipeline(model, measure=False, **explicit)  # the cached choice, if any
    runner = _as_runner(model, device, settings.threads)
    card = runner.card
    pre = card.preprocessing
    report.total = len(images.paths)

    from featurebank.store import open_store

    st = None if store is None else (store if hasattr(store, "space") else open_store(store))
    spaces = open_spaces(st, card, decode_mode, dtype=store_dtype) if st is not None else {}

    # read: content keys (stat-cached), then what is missing
    t = time.perf_counter()
    keys, read_errors = _hash(st, images.paths)
    timings["read"] += time.perf_counter() - t
    memory: dict[str, dict[str, np.ndarray]] = {o.name: {} for o in card.outputs}
    failures: list[tuple[str, str | None, str]] = [(path, None, reason) for path, reason in read_errors.items()]
    first_space = next(iter(spaces.values()), None)
    label_of = dict(zip(images.paths, images.labels))
    plan = plan_work(st, spaces, images.paths, keys, retry_failed=retry_failed, repair=repair)
    unique, todo_keys = plan.unique, plan.todo
    report.duplicates, report.cached, report.skipped_failed = plan.duplicates, plan.cached, plan.skipped_failed
    report.damaged, report.quarantined = plan.damaged, plan.quarantined

    runner, settings = tune_for_run(model, runner, settings, len(todo_keys), **explicit)
    batch_size, workers = settings.batch_size, settings.workers
    report.settings = settings.to_dict()

    # decode + infer + write: decoding runs ahead on a thread pool, and each batch's vectors go
    # into the store on a writer thread while the next batch infers (a write, with its fsync,
    # took 7-15% of a run's time when it sat between two inferences: benchmarks/embed_throughput.py)
    bar = _progress(len(todo_keys), bool(progress), "embedding")
    batches = [todo_keys[i : i + batch_size] for i in range(0, len(todo_keys), batch_size)]

    def write(ok_keys: list[str], outs: dict[str, np.ndarray]) -> None:
        t = time.perf_counter()
        ok_paths = [unique[k] for k in ok_keys]
        for name, vecs in outs.items():
            if name in spaces:
                # a space that already holds a key (shared with another export of the same
                # layer) does not get it twice
                rows = [i for i, k in enumerate(ok_keys) if k in plan.need[name]]
                if rows:
                    spaces[name].add([ok_keys[i] for i in rows], vecs[rows], paths=[ok_paths[i] for i in rows],
                                     labels=[label_of.get(ok_paths[i]) for i in rows])
            else:
                memory[name].update(zip(ok_keys, vecs))
        timings["write"] += time.perf_counter() - t

    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fb-write")  # one: shards land in order
    writes: deque[Future] = deque()
    try:
        # on a CPU-only run inference is the critical path: decoding fills its gaps at a lower
        # priority, unless the measurement found that slower (other sessions on the cores)
        ahead = decode_ahead(([unique[k] for k in b] for b in batches), pre, mode=decode_mode, workers=workers,
                             lower_priority=settings.lower_priority and not runner.on_cuda)
        with closing(ahead):  # on an error, the decode threads finish before it propagates
            for batch_keys, got in zip(batches, ahead):
                timings["decode"] += got.seconds
                for i, exc in got.failures:
                    failures.append((unique[batch_keys[i]], batch_keys[i], str(exc)))
                ok_keys = [k for k, ok in zip(batch_keys, got.ok) if ok]
                if ok_keys:
                    t = time.perf_counter()
                    outs = infer_batch(runner, got.decoded)
                    timings["infer"] += time.perf_counter() - t
                    while len(writes) >= _WRITES_IN_FLIGHT:  # bounded: memory stays flat
                        writes.popleft().result()
                    writes.append(writer.submit(write, ok_keys, outs))
                    report.embedded += len(ok_keys)
                bar.update(len(batch_keys))
        while writes:
            writes.popleft().result()  # a failed write raises here
    finally:
        writer.shutdown(wait=True)  # also on an error: no write runs on behind the caller's back
        bar.close()
        if st is not None and failures and first_space is not None:
            st.record_failures(first_space.fingerprint, [{"path": p, "key": k, "reason": r} for p, k, r in failures])

    report.failed = len(failures)
    report.failures = [(p, r) for p, _, r in failures]
    failed_keys = {k for _, k, _ in failures if k}

    vectors: dict[str, np.ndarray] = {}
    ok = np.array([bool(k) and k not in failed_keys for k in keys], bool)
    if return_vectors:
        for o in card.outputs:
            X = np.zeros((len(keys), o.dim), np.float32)
            rows = [i for i, k in enumerate(keys) if ok[i]]
            want = [keys[i] for i in rows]
            if o.name in spaces:
                got, found = spaces[o.name].get(want) if want else (np.zeros((0, o.dim), np.float32), np.zeros(0, bool))
                found = np.asarray(found, bool)
                X[rows] = np.where(found[:, None], got, 0.0)
                for i, f in zip(rows, found):
                    ok[i] &= bool(f)
            else:
                for i in rows:
                    vec = memory[o.name].get(keys[i])
                    if vec is None:
                        ok[i] = False
                    else:
                        X[i] = vec
            vectors[o.name] = X
    report.elapsed = time.perf_counter() - t_start
    report.timings = timings
    return Embeddings(paths=list(images.paths), labels=list(images.labels), keys=keys, ok=ok, vectors=vectors, report=report)


def open_spaces(store: Any, card: Any, decode_mode: str, *, dtype: str | None = None) -> dict[str, Any]:
    """The store space of each model output under ``decode_mode`` (created when new), keyed
    by output name; each records the model card output, backbone and preprocessing."""
    pre = card.preprocessing
    return {
        o.name: store.space(
            space_fingerprint(o.fingerprint, decode_mode), dim=o.dim, dtype=dtype,
            info={"model_card_fingerprint": card.fingerprint, "output": o.to_dict(), "backbone": card.backbone,
                  "decode_mode": decode_mode, "preprocessing": pre.to_dict()},
        )
        for o in card.outputs
    }


@dataclass
class WorkPlan:
    """What a run must embed. ``unique``: content key -> first path with those bytes;
    ``todo``: keys to embed (missing from at least one space, not a known failure unless
    retried); ``need``: output name -> keys that space lacks; ``cached_keys``: keys every
    space already holds; ``damaged``: keys whose cached vectors failed their checksum (now
    missing, so in ``need``); ``quarantined``: the shards moved aside for that."""

    unique: dict[str, str]
    todo: list[str]
    need: dict[str, set[str]]
    cached_keys: set[str]
    duplicates: int
    skipped_failed: int
    damaged: int = 0
    quarantined: list[str] = field(default_factory=list)

    @property
    def cached(self) -> int:
        return len(self.cached_keys)


def plan_work(store: Any, spaces: dict[str, Any], paths: Sequence[str], keys: Sequence[str], *,
              retry_failed: bool = False, repair: bool = True) -> WorkPlan:
    """Decide what to embed: each distinct content once, only where a space lacks it, and
    known failures only when ``retry_failed``. With ``repair``, shards whose batches serving
    these keys fail their checksum are quarantined first, so their keys count as missing.
    Shared by the local and the Ray embedder."""
    unique: dict[str, str] = {}
    for path, key in zip(paths, keys):
        if key and key not in unique:
            unique[key] = path
    duplicates = sum(1 for k in keys if k) - len(unique)
    candidates = list(unique)
    need: dict[str, set[str]] = {}
    damaged: set[str] = set()
    quarantined: list[str] = []
    for name, sp in spaces.items():
        held = np.asarray(sp.contains(candidates), bool) if candidates else np.zeros(0, bool)
        bad = sp.damaged_shards(candidates) if repair and candidates else []
        if bad:
            moved = [str(p) for p in sp.quarantine(bad)]
            quarantined.extend(moved)
            before = held
            held = np.asarray(sp.contains(candidates), bool)
            damaged.update(k for k, b, h in zip(candidates, before, held) if b and not h)
            log.warning("%s: %d cached vectors failed their checksum; moved %s to quarantine, embedding them again",
                        name, int((before & ~held).sum()), ", ".join(moved) or "nothing (moved by another process)")
        need[name] = {k for k, h in zip(candidates, held) if not h}
    missing = set().union(*need.values()) if need else set(candidates)
    cached_keys = set(candidates) - missing if spaces else set()
    todo = [k for k in candidates if k in missing]
    skipped = 0
    if spaces and not retry_failed and todo:
        first = next(iter(spaces.values()))
        known = {f.key for f in store.failures(first.fingerprint) if f.key}
        skipped = sum(1 for k in todo if k in known)
        todo = [k for k in todo if k not in known]
    return WorkPlan(unique, todo, need, cached_keys, duplicates, skipped, len(damaged), quarantined)


def _hash(store: Any, paths: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    """Content keys for ``paths`` ("" where unreadable) and {path: reason} for those."""
    if store is not None:
        hashed = store.hash_files(paths)
        return [k or "" for k in hashed.keys], {p: e for p, e in hashed.failed()}
    import hashlib

    from featurebank._files import open_image_file

    keys, errors = [], {}
    for p in paths:
        try:
            # never a bare open(): a FIFO or a link to /dev/zero would hang the run
            with open_image_file(p) as fh:
                keys.append(hashlib.file_digest(fh, "sha256").hexdigest())
        except FeaturebankError as exc:
            keys.append("")
            errors[p] = str(exc)
        except OSError as exc:
            keys.append("")
            errors[p] = f"{exc.strerror or exc}"
    return keys, errors


def load_embeddings(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | ImageList,
    model: str | os.PathLike[str] | ModelRunner,
    store: Any,
    *,
    output: str | None = None,
    decode_mode: str = DEFAULT_DECODE_MODE,
    progress: bool | None = None,
    **embed_options: Any,
) -> tuple[np.ndarray, list[str], list[str | None], list[str]]:
    """``(X, keys, labels, paths)`` for the images of ``source``, in source order, read from
    the store; images not embedded yet are embedded first, so this is also the way to get a
    training set.

    X : ndarray of shape (n_ok, dim), float32. Images that failed are left out (they are
    listed by ``featurebank store failures``).

    Raises StoreError if a cached vector of these images fails its checksum (a damaged
    shard): run ``featurebank store verify STORE --quarantine``, then load again.
    """
    runner = _as_runner(model, embed_options.pop("device", "auto"), embed_options.pop("threads", None))
    out = runner.card.output(output)  # by name or layer; the only one when None
    X, keys, labels, paths, _ = _read_rows(source, runner, out, store, decode_mode, progress, embed_options)
    return X, keys, labels, paths


def _read_rows(source, runner, out, store, decode_mode, progress, embed_options):
    """Embed what the store lacks, then ``(rows of out, keys, labels, paths, report)`` of the
    images that did not fail, in source order."""
    # a training set is read as stored: damaged cached vectors refuse (StoreError naming the
    # shard and `store verify --quarantine`) rather than being repaired behind the user's back
    embed_options.setdefault("repair", False)
    emb = embed_images(source, runner, store=store, decode_mode=decode_mode, progress=progress, **embed_options)
    idx = np.flatnonzero(emb.ok)
    return (emb.vectors[out.name][idx], [emb.keys[i] for i in idx], [emb.labels[i] for i in idx],
            [emb.paths[i] for i in idx], emb.report)


def load_activations(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | ImageList,
    model: str | os.PathLike[str] | ModelRunner,
    store: Any,
    *,
    output: str | None = None,
    decode_mode: str = DEFAULT_DECODE_MODE,
    progress: bool | None = None,
    **embed_options: Any,
) -> tuple[np.ndarray, list[str], list[str | None], list[str], EmbedReport]:
    """The fine-tuning counterpart of :func:`load_embeddings`: ``(A, keys, labels, paths,
    report)`` for the images of ``source``, read from the store's **activation space** of
    ``model`` (an export with ``pool="none"``, such as the frozen bottom of a network),
    embedding first what the store lacks.

    A : ndarray of shape (n_ok, C, H, W) float32, reshaped from the flattened rows by the
    shape recorded in the model card output (and so in the space). Images that failed are
    left out; ``report`` says how many were embedded, read from the store, failed.

    This is the one way to read activation maps: indexes, search, store export and classifiers
    refuse them (ActivationSpaceError). Raises ValueError when the output is not an activation
    map (use :func:`load_embeddings`), StoreError on a damaged cached shard (as
    :func:`load_embeddings`).
    """
    runner = _as_runner(model, embed_options.pop("device", "auto"), embed_options.pop("threads", None))
    out = runner.card.output(output)
    if not out.is_activation_map:
        raise ValueError(f"output {out.name!r} of {runner.card.backbone} is pooled ({out.pooling}), not an activation "
                         "map; read embeddings with load_embeddings")
    rows, keys, labels, paths, report = _read_rows(source, runner, out, store, decode_mode, progress, embed_options)
    return rows.reshape((len(rows), *out.shape)), keys, labels, paths, report
