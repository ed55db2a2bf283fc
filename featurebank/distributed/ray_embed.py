"""Embedding on a Ray cluster, into the same store as :func:`~featurebank.embedder.embed_images`.

A Ray Data pipeline with the local embedder's stages spread over a cluster:

* **read** (driver): list the inputs, hash their bytes (the store's stat cache for files,
  fsspec for URLs) and drop what the store already holds for this model and decode mode,
  exactly as the local embedder does;
* **decode** (Ray tasks, ``map_batches`` with a function, ``num_cpus_per_decode_task`` CPUs
  each): read and preprocess one batch of images to uint8 pixels;
* **infer + write** (a pool of Ray actors): each actor builds one onnxruntime session in its
  ``__init__`` (from model bytes shipped once through the object store, never a pickled
  session), runs its batches and commits each batch as one shard with ``space.add``;
* **catalog** (driver): as each batch comes back, the driver records its items (path, key,
  label) and failures in the store's catalog. The catalog is one SQLite file in WAL mode,
  which SQLite does not support from several hosts over a network filesystem, so only the
  driver's host touches it; shards are renamed into place and are safe on NFS.

Robustness: Ray restarts a dead actor and retries its batch, and decode tasks are retried.
A retried batch first asks the store which of its keys an earlier attempt already committed
(shards are atomic), so a worker dying after its write adds no duplicate rows. A killed
driver loses at most the batches in flight; running again embeds only what is missing and
records the items of vectors that were written but not yet catalogued.

Ray is imported here only, inside functions, so featurebank imports without it.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import sys
import tempfile
import time
from typing import Any, Mapping, Sequence

import numpy as np

from featurebank import errors as fb_errors
from featurebank._atomic import write_bytes_atomic
from featurebank.artifact import DEFAULT_DECODE_MODE, check_decode_mode, read_model_card
from featurebank.distributed.locations import hash_urls, is_url, list_sources, read_url
from featurebank.embed_into_store import EmbedReport, open_spaces, plan_work
from featurebank.embedder.sources import ImageList
from featurebank.errors import ClusterError, FeaturebankError, ImageDecodeError

__all__ = ["embed_images_ray"]

_DECODE_MEMORY = 256 * 2**20
# map_batches takes these by name; other Ray options go through its (deprecated) **kwargs
_NAMED_REMOTE_ARGS = ("runtime_env", "resources", "accelerator_type", "memory", "label_selector")


def embed_images_ray(
    source: str | os.PathLike[str] | Sequence[str | os.PathLike[str]] | ImageList,
    model: str | os.PathLike[str] | Any,
    *,
    store: str | os.PathLike[str],
    address: str | None = "auto",
    decode_mode: str = DEFAULT_DECODE_MODE,
    batch_size: int = 32,
    num_actors: int | None = None,
    num_cpus_per_actor: float = 1,
    num_gpus_per_actor: float | None = None,
    num_cpus_per_decode_task: float = 1,
    retry_failed: bool = False,
    ray_remote_args: Mapping[str, Any] | None = None,
    progress: bool | None = None,
) -> EmbedReport:
    """Embed images on a Ray cluster into a store; the same vectors and store format as
    :func:`~featurebank.embed_into_store.embed_images`.

    Parameters
    ----------
    source : folder, ``.txt``/``.csv``/``.parquet`` list, image file, ``file://`` or other
        fsspec URL (folder or file), or a list of these; or an :class:`ImageList`
    model : path of a featurebank ONNX model (or an open ``ModelRunner``, whose path is used).
        It is read on the driver and shipped to the actors through Ray's object store.
    store : store directory, on a filesystem every node mounts at this same path
    address : ``"auto"`` (the cluster started with ``ray start`` on this machine), ``None``
        (start a private local Ray instance for this call), or ``"ray://host:10001"`` /
        ``"host:6379"``. Ignored when this process is already connected (``ray.init`` done).
    decode_mode : ``"fast"`` or ``"exact"``; part of the cache key, as locally
    batch_size : images per decode task, per inference call and per store shard
    num_actors : inference actors (default: one per GPU when actors take GPUs, else half the
        cluster's CPUs divided by ``num_cpus_per_actor``, at least 1)
    num_cpus_per_actor : CPUs reserved per actor; also its onnxruntime thread count (rounded up)
    num_gpus_per_actor : GPUs per actor; ``None``: 1 if the cluster has GPUs, else 0. With
        GPUs the actor requires CUDA (``device="cuda"``: fails loudly if it does not start)
    num_cpus_per_decode_task : CPUs reserved per decode task
    retry_failed : decode again the images a previous run recorded as failed
    ray_remote_args : extra Ray options for the actors (``runtime_env``, ``resources``,
        ``accelerator_type``, ``max_restarts``, ...)
    progress : progress bar on stderr (default: when stderr is a terminal)

    Returns
    -------
    EmbedReport
        ``total``, ``embedded``, ``cached``, ``duplicates``, ``failed``, ``skipped_failed``,
        ``elapsed`` and ``timings`` (seconds per stage: ``read`` on the driver; ``decode``,
        ``infer``, ``write`` summed over workers).

    Raises
    ------
    ClusterError
        Ray is not installed, the cluster cannot be reached, or a worker cannot see the store.

    Example
    -------
    >>> report = embed_images_ray("photos/", "lite0.onnx", store="/shared/store")  # doctest: +SKIP
    >>> print(report.summary())                                                     # doctest: +SKIP
    """
    check_decode_mode(decode_mode)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer; got batch_size={batch_size!r}")
    if num_actors is not None and (isinstance(num_actors, bool) or not isinstance(num_actors, int) or num_actors < 1):
        raise ValueError(f"num_actors must be a positive integer or None (auto); got num_actors={num_actors!r}")
    for name, value, low in (("num_cpus_per_actor", num_cpus_per_actor, 0.0), ("num_cpus_per_decode_task", num_cpus_per_decode_task, 0.0)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > low:
            raise ValueError(f"{name} must be a positive number of CPUs; got {name}={value!r}")
    if num_gpus_per_actor is not None and (
        isinstance(num_gpus_per_actor, bool) or not isinstance(num_gpus_per_actor, (int, float)) or num_gpus_per_actor < 0
    ):
        raise ValueError(f"num_gpus_per_actor must be >= 0 or None (auto); got num_gpus_per_actor={num_gpus_per_actor!r}")
    if address is not None and not isinstance(address, str):
        raise ValueError(f"address must be 'auto', None or a Ray address string; got address={address!r}")
    if progress is None:
        progress = sys.stderr.isatty()
    model_path = os.path.abspath(os.fspath(getattr(model, "path", model)))
    if not os.path.isfile(model_path):
        from featurebank.errors import NotOnnxModelError

        raise NotOnnxModelError(f"no model file at {model_path!r}; export one with `featurebank export -o {model_path}`")

    t_start = time.perf_counter()
    report = EmbedReport()
    timings = {"read": 0.0, "decode": 0.0, "infer": 0.0, "write": 0.0}

    # ---- read (driver): list, hash, skip what the store holds -- the local embedder's rules
    t = time.perf_counter()
    images = list_sources(source)
    card = read_model_card(model_path)
    report.total = len(images.paths)
    from featurebank.store import open_store

    store_dir = os.path.abspath(os.fspath(store))
    st = open_store(store_dir)
    spaces = open_spaces(st, card, decode_mode)
    first_space = next(iter(spaces.values()))
    keys, read_failures = _hash_all(st, images.paths)
    label_of = dict(zip(images.paths, images.labels))
    plan = plan_work(st, spaces, images.paths, keys, retry_failed=retry_failed)
    unique, todo = plan.unique, plan.todo
    report.duplicates, report.cached, report.skipped_failed = plan.duplicates, plan.cached, plan.skipped_failed
    _record_missing_items(st, [(p, k, label_of.get(p)) for p, k in zip(images.paths, keys) if k], plan.cached_keys)
    stored = [{"path": p, "key": None, "reason": r} for p, r in read_failures if not is_url(p)]
    if stored:  # the store keeps local paths only; URL failures are in the report
        st.record_failures(first_space.fingerprint, stored)
    timings["read"] = time.perf_counter() - t
    failures: list[tuple[str, str]] = list(read_failures)

    # ---- decode + infer + write on the cluster
    if todo:
        # None labels would come back as NaN from Arrow's object columns: carry a flag instead
        rows = [{"key": k, "path": unique[k], "label": label_of.get(unique[k]) or "",
                 "has_label": label_of.get(unique[k]) is not None} for k in todo]
        for got in _run_on_cluster(
            rows, model_path, store_dir, {n: s.fingerprint for n, s in spaces.items()}, card,
            address=address, decode_mode=decode_mode, batch_size=batch_size, num_actors=num_actors,
            num_cpus_per_actor=float(num_cpus_per_actor), num_gpus_per_actor=num_gpus_per_actor,
            num_cpus_per_decode_task=float(num_cpus_per_decode_task), ray_remote_args=dict(ray_remote_args or {}),
            progress=bool(progress),
        ):
            ok = got["reason"] == ""
            report.embedded += int(ok.sum())
            failures += [(str(p), str(r)) for p, r in zip(got["path"][~ok], got["reason"][~ok])]
            t = time.perf_counter()
            _record_batch(st, spaces, got)
            timings["write"] += time.perf_counter() - t
            for stage in ("decode", "infer", "write"):
                timings[stage] += float(got[stage + "_s"].sum())

    report.failed = len(failures)
    report.failures = failures
    report.timings = timings
    report.elapsed = time.perf_counter() - t_start
    return report


def _record_batch(st: Any, spaces: Mapping[str, Any], got: Mapping[str, np.ndarray]) -> None:
    """Catalog one returned batch as ``space.add(paths=...)`` and the local embedder do: items
    and cleared failures of what was embedded, failures of what was not. Local files only:
    the store keeps item paths as absolute local paths and would mangle a URL."""
    ok_rows = [i for i, r in enumerate(got["reason"]) if r == "" and not is_url(str(got["path"][i]))]
    bad_rows = [i for i, r in enumerate(got["reason"]) if r != "" and not is_url(str(got["path"][i]))]
    if ok_rows:
        paths = [str(got["path"][i]) for i in ok_rows]
        st.record_items(paths, [str(got["key"][i]) for i in ok_rows],
                        [str(got["label"][i]) if got["has_label"][i] else None for i in ok_rows])
        for sp in spaces.values():
            st.clear_failures(sp.fingerprint, paths)
    if bad_rows:
        st.record_failures(next(iter(spaces.values())).fingerprint,
                           [{"path": str(got["path"][i]), "key": str(got["key"][i]), "reason": str(got["reason"][i])}
                            for i in bad_rows])


def _record_missing_items(st: Any, rows: Sequence[tuple[str, str, str | None]], cached: set[str]) -> None:
    """Items for cached vectors that the catalog lacks: a driver killed after its workers wrote
    shards, before it catalogued them."""
    if not cached:
        return
    known = {(i.path, i.key) for i in st.items()}
    missing = [r for r in rows if r[1] in cached and not is_url(r[0]) and (os.path.abspath(r[0]), r[1]) not in known]
    if missing:
        st.record_items([r[0] for r in missing], [r[1] for r in missing], [r[2] for r in missing])


def _hash_all(st: Any, paths: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Content keys aligned with ``paths`` ("" where unreadable) and (path, reason) failures."""
    keys = [""] * len(paths)
    failures: list[tuple[str, str]] = []
    local = [i for i, p in enumerate(paths) if not is_url(p)]
    remote = [i for i, p in enumerate(paths) if is_url(p)]
    if local:
        hashed = st.hash_files([paths[i] for i in local])
        for i, k, e in zip(local, hashed.keys, hashed.errors):
            keys[i] = k or ""
            if e is not None:
                failures.append((paths[i], e))
    if remote:
        got, errs = hash_urls([paths[i] for i in remote])
        for i, k, e in zip(remote, got, errs):
            keys[i] = k or ""
            if e is not None:
                failures.append((paths[i], e))
    return keys, failures


# ------------------------------------------------------------------------------- cluster
def _import_ray():
    try:
        import ray
        import ray.data  # noqa: F401 - Ray Data ships in the "data" extra
    except ImportError as exc:
        raise ClusterError(
            f"embedding on a cluster needs Ray Data ({exc}); install it with `pip install 'featurebank[ray]'` "
            "(or `pip install 'ray[data]'`) on the driver and on every node"
        ) from None
    return ray


def _connect(ray: Any, address: str | None) -> bool:
    """Connect to (or start) Ray; True when this call did, so it disconnects at the end."""
    if ray.is_initialized():
        return False
    # options of a new instance; Ray refuses them when connecting to a running cluster
    kwargs: dict[str, Any] = {"include_dashboard": False} if address is None else {}
    try:
        if address not in (None, "auto"):
            _check_reachable(address)
        ray.init(address=address, **kwargs)
    except ConnectionError as exc:
        raise ClusterError(
            f"cannot reach a Ray cluster at address={address!r} ({str(exc).splitlines()[0][:200]}); start one with "
            "`ray start --head` (and `ray start --address=HEAD:6379` on the other nodes), or pass address=None "
            "(CLI: --ray local) to start a private one on this machine"
        ) from None
    return True


def _check_reachable(address: str, timeout: float = 10.0) -> None:
    """Fail fast on a host:port nobody listens on: Ray itself retries such an address for
    minutes before it gives up."""
    import socket

    hostport = address.split("://", 1)[-1].rstrip("/")
    host, sep, port = hostport.rpartition(":")
    if not sep or not port.isdigit():
        return  # let Ray parse (and reject) what it understands
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as exc:
        raise ConnectionError(f"nothing answers at {host}:{port}: {exc.strerror or exc}") from None


def _run_on_cluster(rows, model_path, store_dir, space_fps, card, *, address, decode_mode, batch_size, num_actors,
                    num_cpus_per_actor, num_gpus_per_actor, num_cpus_per_decode_task, ray_remote_args, progress):
    """Yield one numpy batch ``{key, path, reason, decode_s, infer_s, write_s}`` per shard."""
    ray = _import_ray()
    started = _connect(ray, address)
    try:
        resources = ray.cluster_resources()
        gpus = float(resources.get("GPU", 0.0))
        if num_gpus_per_actor is None:
            num_gpus_per_actor = 1.0 if gpus > 0 else 0.0
        if num_gpus_per_actor > 0 and gpus < num_gpus_per_actor:
            raise ClusterError(
                f"num_gpus_per_actor={num_gpus_per_actor} but the cluster has {gpus:g} GPUs; pass num_gpus_per_actor=0 "
                "(CLI: --device cpu) to run on CPUs"
            )
        cpus = float(resources.get("CPU", 0.0))
        if num_actors is None:
            if num_gpus_per_actor > 0:
                num_actors = max(1, int(gpus // num_gpus_per_actor))
            else:
                # half the CPUs infer, half decode. With efficientnet_lite0 and fast decoding
                # one CPU decodes ~1.8x the images one CPU infers (benchmarks/ray_scaling.py),
                # so inference stays the busier stage; exact mode and larger photos move the
                # balance toward decoding, and half is safe both ways.
                num_actors = max(1, int((cpus / 2) // num_cpus_per_actor))
        need = num_actors * num_cpus_per_actor + num_cpus_per_decode_task
        if need > cpus + 1e-9:
            raise ClusterError(
                f"{num_actors} actors x {num_cpus_per_actor:g} CPUs + one decode task x {num_cpus_per_decode_task:g} CPUs "
                f"= {need:g} CPUs, but the cluster has {cpus:g}; lower num_actors or the CPUs per actor/task "
                "(the pipeline would wait forever for decode CPUs)"
            )
        with open(model_path, "rb") as fh:
            model_bytes = fh.read()
        model_sha = hashlib.sha256(model_bytes).hexdigest()
        model_ref = ray.put(model_bytes)
        del model_bytes

        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False  # ours counts images; Ray's counts blocks
        # ... and Ray warns once that its bars are off, which we chose
        logging.getLogger("ray.data._internal.progress").addFilter(_drop_bars_notice)
        if hasattr(ctx, "enable_operator_progress_bars"):
            ctx.enable_operator_progress_bars = False
        if not progress:
            logging.getLogger("ray.data").setLevel(logging.WARNING)

        n_blocks = max(1, math.ceil(len(rows) / batch_size))
        ds = ray.data.from_items(rows, override_num_blocks=n_blocks)
        ds = ds.map_batches(
            _decode_batch,
            batch_size=batch_size,
            batch_format="numpy",
            num_cpus=num_cpus_per_decode_task,
            # A decode task holds one full-size image at a time (a 24 MP photo is 72 MB as RGB,
            # plus resampling buffers) and its output batch. Reserving that memory also keeps
            # Ray Data from fusing decoding into the actors (it fuses only stages with equal
            # resources), where it would run in series with inference on the actor's CPUs.
            memory=_DECODE_MEMORY + batch_size * int(np.prod(card.preprocessing.input_size)),
            fn_kwargs={"pre": card.preprocessing, "decode_mode": decode_mode},
        )
        named = {k: v for k, v in ray_remote_args.items() if k in _NAMED_REMOTE_ARGS}
        other = {k: v for k, v in ray_remote_args.items() if k not in _NAMED_REMOTE_ARGS}
        ds = ds.map_batches(
            _EmbedActor,
            batch_size=batch_size,
            batch_format="numpy",
            compute=ray.data.ActorPoolStrategy(size=num_actors),
            num_cpus=num_cpus_per_actor,
            num_gpus=num_gpus_per_actor or None,
            fn_constructor_kwargs={
                "model_ref": [model_ref],  # in a list: Ray resolves top-level refs only, we resolve it ourselves
                "model_sha": model_sha,
                "store_dir": store_dir,
                "space_fps": space_fps,
                "device": "cuda" if num_gpus_per_actor > 0 else "cpu",
                "threads": max(1, math.ceil(num_cpus_per_actor)),
            },
            **named,
            **other,
        )
        from tqdm import tqdm

        bar = tqdm(total=len(rows), unit="img", desc="embedding (ray)", disable=not progress, file=sys.stderr,
                   smoothing=0.1, dynamic_ncols=True)
        try:
            for got in ds.iter_batches(batch_size=None, batch_format="numpy"):
                bar.update(len(got["key"]))
                yield got
        except Exception as exc:
            cause = _user_cause(exc)
            if cause is not None:
                raise cause from None
            raise
        finally:
            bar.close()
    finally:
        if started:
            ray.shutdown()


def _drop_bars_notice(record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith("Progress bars")


def _user_cause(exc: BaseException) -> FeaturebankError | None:
    """The FeaturebankError a worker raised, unwrapped from Ray's exception wrappers."""
    seen = 0
    cur: BaseException | None = exc
    while cur is not None and seen < 10:
        if isinstance(cur, FeaturebankError):
            return cur
        nxt = getattr(cur, "cause", None)
        cur = nxt if isinstance(nxt, BaseException) else (cur.__cause__ or cur.__context__)
        seen += 1
    # An actor whose __init__ raised comes back as ActorDiedError, which keeps only the
    # worker's traceback text: rebuild the error from its last line.
    found = re.findall(r"featurebank\.errors\.(\w+): ([^\n]+)", str(exc))
    if found:
        cls = getattr(fb_errors, found[-1][0], None)
        if isinstance(cls, type) and issubclass(cls, FeaturebankError):
            return cls(found[-1][1])
    return None


# ------------------------------------------------------------------------------- workers
def _decode_batch(batch: dict[str, np.ndarray], *, pre: Any, decode_mode: str) -> dict[str, np.ndarray]:
    """Ray task: ``{key, path, label}`` -> ``+ pixels (N, H, W, C) uint8, error, decode_s``.

    Rows that fail keep zero pixels and carry the reason in ``error`` ("" when decoded).
    """
    from featurebank.embedder.batches import decode_batch

    paths = [str(p) for p in batch["path"]]
    decoded = decode_batch(list(zip(paths, (str(k) for k in batch["key"]))), pre, mode=decode_mode, names=paths,
                           read=_read_source)
    errors = np.full(len(paths), "", dtype=object)
    for i, exc in decoded.failures:
        errors[i] = str(exc)
    out = dict(batch)
    out["pixels"] = decoded.pixels
    out["error"] = errors
    out["decode_s"] = np.zeros(len(paths), np.float64)
    if len(paths):
        out["decode_s"][0] = decoded.seconds
    return out


def _read_source(item: tuple[str, str]) -> str | bytes:
    """A local path as it is; a URL's bytes, refused when they no longer match their key."""
    path, key = item
    if not is_url(path):
        return path
    data = read_url(path)
    if hashlib.sha256(data).hexdigest() != key:
        raise ImageDecodeError(
            f"{path}: changed while being embedded (its bytes no longer match their key); run again")
    return data


def _local_model_file(data: bytes, sha: str) -> str:
    """The shipped model written once per node under the temp dir (atomic rename)."""
    d = os.path.join(tempfile.gettempdir(), "featurebank-models")
    os.makedirs(d, exist_ok=True)
    path = os.path.join(d, sha + ".onnx")
    if not os.path.isfile(path):
        write_bytes_atomic(path, data)
    return path


class _EmbedActor:
    """Ray actor: one onnxruntime session and one store handle, built here, never pickled."""

    def __init__(self, *, model_ref: list, model_sha: str, store_dir: str, space_fps: dict[str, str], device: str,
                 threads: int) -> None:
        import ray

        from featurebank.embedder.session import open_model

        self.runner = open_model(_local_model_file(ray.get(model_ref[0]), model_sha), device=device, threads=threads)
        self.spaces = _node_spaces(store_dir, space_fps)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from featurebank.embedder.batches import infer_batch

        keys = [str(k) for k in batch["key"]]
        errors = [str(e) for e in batch["error"]]
        n = len(keys)
        ok = np.array([e == "" for e in errors], bool)
        infer_s = write_s = 0.0
        if ok.any():
            # A retried batch (the actor died after writing) must not add its rows twice, and
            # with several outputs it may have died between two spaces' shards: each space
            # gets only the keys it lacks.
            missing = {name: ok & ~np.asarray(sp.contains(keys), bool) for name, sp in self.spaces.items()}
            idx = np.flatnonzero(np.logical_or.reduce(list(missing.values())))
            if len(idx):
                t = time.perf_counter()
                outs = infer_batch(self.runner, np.ascontiguousarray(batch["pixels"][idx]))
                infer_s = time.perf_counter() - t
                t = time.perf_counter()
                for name, sp in self.spaces.items():
                    sel = missing[name][idx]
                    if sel.any():  # vectors only: the driver catalogues the items
                        sp.add([keys[i] for i in idx[sel]], outs[name][sel])
                write_s = time.perf_counter() - t
        z = np.zeros(n, np.float64)
        timing = {s: z.copy() for s in ("decode_s", "infer_s", "write_s")}
        if n:
            timing["decode_s"][0] = float(np.sum(batch["decode_s"]))
            timing["infer_s"][0], timing["write_s"][0] = infer_s, write_s
        return {"key": np.asarray(keys, dtype=object), "path": batch["path"],
                "label": batch["label"], "has_label": batch["has_label"], "reason": np.asarray(errors, dtype=object),
                **timing}


def _node_spaces(store_dir: str, space_fps: Mapping[str, str]) -> dict[str, Any]:
    """The spaces ``space_fps`` ({output name: fingerprint}) of the store at ``store_dir``,
    opened on this node for shard reads and writes only: the driver's host keeps the catalog
    (SQLite in WAL mode must not be opened from several hosts over a network filesystem)."""
    from featurebank.errors import StoreError
    from featurebank.store import open_store

    try:
        st = open_store(store_dir, create=False, catalog=False)
        return {name: st.space(fp) for name, fp in space_fps.items()}
    except StoreError as exc:
        raise ClusterError(
            f"node {os.uname().nodename} cannot use the store at {store_dir} ({exc}); the store must be on a "
            "filesystem that every node mounts at the same path (NFS, a cluster filesystem, ...)"
        ) from None
