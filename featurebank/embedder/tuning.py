"""Pipeline settings chosen by measurement: batch size and the thread split, per machine and model.

Which batch size, how many onnxruntime intra-op threads and how many decode threads embed
fastest depends on the CPU, on how much of it this process may use, on the onnxruntime build
and on the model, and no constant is right everywhere: on a 2-core machine that others share,
one intra-op thread with decoding on the other core can beat two intra-op threads that wait
on each other at every operator; on a quiet one it is the other way round. So the first embed
with a model on a machine measures it (:func:`tune_pipeline`: a few seconds, with a line on
stderr saying so), and the choice is cached beside the model in ``<model>.tuning.json``.

The cache is keyed (:func:`tuning_key`) by the CPU model, the cores this process may use and
its cgroup CPU quota, the onnxruntime version, the provider, the model (its card's
fingerprint) and the decode mode. Model files get copied between machines with their
caches: an entry made under another key is never used, the settings are measured again and
added beside it. Explicit arguments always win; the ones left open are chosen from the
measurement under the ones given (e.g. the best batch size for ``threads=1``).

What is measured, in two steps so that a few seconds suffice: the model alone, for each
intra-op thread count and batch size of a small grid, picks each thread count's batch size;
then the real pipeline (:func:`~featurebank.embedder.batches.decode_ahead` decoding JPEGs
while :func:`~featurebank.embedder.batches.infer_batch` runs the model) for each thread
count with its batch size, with decode threads on all cores or only on the cores onnxruntime
leaves free, in two interleaved rounds (the median counts). The JPEGs are made here, at the
sizes of a typical photo folder (500x375 to 1600x1200), with the frequency content of photos
(1/f), so that decoding costs what it costs on real photos.

>>> settings = tune_pipeline("lite0.onnx")            # doctest: +SKIP
>>> settings.batch_size, settings.threads, settings.workers   # doctest: +SKIP
(16, 2, 2)
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import logging
import math
import os
import sys
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import onnxruntime as ort

from featurebank._atomic import write_bytes_atomic
from featurebank.artifact import DEFAULT_DECODE_MODE, ModelCard, check_decode_mode
from featurebank.embedder.batches import decode_ahead, infer_batch
from featurebank.embedder.devices import DEVICES
from featurebank.embedder.session import ModelRunner, check_model_file, open_model, physical_cores, providers_for

__all__ = ["MEASURE_MIN_IMAGES", "PipelineSettings", "TUNING_SUFFIX", "calibration_jpegs", "cgroup_cpu_quota",
           "cpu_model_name", "machine_facts", "model_identity", "tune_for_run", "tune_pipeline", "tuning_file",
           "tuning_key", "usable_cores"]

log = logging.getLogger("featurebank")

#: The cache file of a model is the model's path with this appended.
TUNING_SUFFIX = ".tuning.json"
_FORMAT = 1
_MAX_ENTRIES = 16  # one per machine x decode mode a model file has met; the oldest go first
_TAIL = 65536
#: :func:`~featurebank.embed_into_store.embed_images` measures (when nothing is cached) only
#: for runs of at least this many images to embed: the measurement takes a few seconds, more
#: than a smaller run could gain.
MEASURE_MIN_IMAGES = 256

CPU_BATCH_SIZES = (8, 16, 32)
GPU_BATCH_SIZES = (32, 64, 128)
# per grid point and round, once the pipeline has filled: this long, or this many batches
# (a tiny model is measured in a fraction of the time), and at least one batch
POINT_SECONDS = 0.25
POINT_BATCHES = 4
ROUNDS = 2
# within this fraction of the best, the larger batch wins (fewer, larger store shards)
_TIE = 0.02
# the calibration images: the issue #14 size mix, one file per entry
_CALIBRATION_SIZES = ((500, 375), (375, 500), (640, 480), (500, 375), (800, 600), (1024, 768), (500, 375),
                      (640, 480), (375, 500), (1600, 1200), (500, 375), (640, 480))


@dataclass(frozen=True)
class PipelineSettings:
    """How to run the embed pipeline.

    Attributes
    ----------
    batch_size : images per inference batch (and per store shard)
    threads : onnxruntime intra-op threads
    workers : decode threads
    lower_priority : decode threads at a lower priority than inference
        (:func:`~featurebank.embedder.batches.lower_thread_priority`): right on a machine of
        its own, where decoding then fills onnxruntime's gaps; wrong where other sessions
        share the cores (Linux's autogroup scheduler then shrinks this process's share of the
        core the decode threads run on), which the measurement sees
    origin : ``"measured"`` (just now), ``"cached"`` (from ``<model>.tuning.json``),
        ``"explicit"`` (all three given by the caller) or ``"default"`` (not measured yet:
        ``measure=False`` and nothing cached)
    """

    batch_size: int
    threads: int
    workers: int
    origin: str
    lower_priority: bool = True

    def to_dict(self) -> dict[str, Any]:
        return {"batch_size": self.batch_size, "threads": self.threads, "workers": self.workers,
                "lower_priority": self.lower_priority, "origin": self.origin}


# ---------------------------------------------------------------------------------------
# the key
# ---------------------------------------------------------------------------------------


def cpu_model_name(cpuinfo: str | os.PathLike[str] = "/proc/cpuinfo") -> str:
    """The CPU's model name (``/proc/cpuinfo``'s ``model name``; elsewhere the platform's word)."""
    try:
        with open(cpuinfo, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                key, sep, value = line.partition(":")
                if sep and key.strip() in ("model name", "Model", "cpu model"):
                    return " ".join(value.split())
    except OSError:
        pass
    import platform

    return platform.processor() or platform.machine() or "unknown"


def cgroup_cpu_quota(root: str | os.PathLike[str] = "/sys/fs/cgroup") -> float | None:
    """This process's CPU quota in cores from its cgroup (v2 ``cpu.max``, or v1
    ``cpu/cpu.cfs_quota_us`` over ``cpu.cfs_period_us``); None when there is none."""
    root = Path(root)
    try:
        fields = (root / "cpu.max").read_text().split()
    except OSError:
        fields = []
    if fields:  # cgroup v2: "max 100000" or "<quota> <period>"
        try:
            return None if fields[0] == "max" else round(int(fields[0]) / int(fields[1]), 3)
        except (ValueError, IndexError, ZeroDivisionError):
            return None
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return round(quota_us / period_us, 3) if quota_us > 0 and period_us > 0 else None


def usable_cores(cores: int | None = None, quota: float | None = None) -> int:
    """The cores this process can keep busy: its CPU affinity, capped by its cgroup quota."""
    cores = physical_cores() if cores is None else cores
    quota = cgroup_cpu_quota() if quota is None else quota
    return max(1, min(cores, math.ceil(quota))) if quota else cores


def machine_facts() -> dict[str, Any]:
    """What the machine-dependent part of the key is made of: ``cpu`` (model name),
    ``cores`` (affinity), ``cpu_quota`` (cgroup, cores or None), ``onnxruntime`` (version)."""
    return {"cpu": cpu_model_name(), "cores": physical_cores(), "cpu_quota": cgroup_cpu_quota(),
            "onnxruntime": ort.__version__}


def model_identity(model: str | os.PathLike[str]) -> dict[str, Any]:
    """What tells one model file from another without loading it: its size and the sha256 of
    its last 64 KiB (where ONNX keeps ``metadata_props``, so the model card is in it)."""
    path = os.fspath(model)
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        fh.seek(max(0, size - _TAIL))
        tail = hashlib.sha256(fh.read()).hexdigest()[:16]
    return {"bytes": size, "tail_sha256": tail}


def tuning_key(model: str | os.PathLike[str], provider: str, decode_mode: str,
               facts: dict[str, Any] | None = None) -> dict[str, Any]:
    """The key a cached choice is valid under: :func:`machine_facts` (or ``facts``), the
    provider, the model file (:func:`model_identity`) and the decode mode. JSON-able."""
    check_decode_mode(decode_mode)
    facts = machine_facts() if facts is None else facts
    return {**{k: facts[k] for k in ("cpu", "cores", "cpu_quota", "onnxruntime")}, "provider": provider,
            "model": model_identity(model), "decode_mode": decode_mode}


def tuning_file(model: str | os.PathLike[str]) -> Path:
    """Where the choice for ``model`` is cached: beside it, ``<model>.tuning.json``."""
    return Path(os.fspath(model) + TUNING_SUFFIX)


# ---------------------------------------------------------------------------------------
# the choice
# ---------------------------------------------------------------------------------------


def tune_pipeline(
    model: str | os.PathLike[str] | ModelRunner,
    *,
    device: str = "auto",
    decode_mode: str = DEFAULT_DECODE_MODE,
    batch_size: int | None = None,
    threads: int | None = None,
    workers: int | None = None,
    progress: bool | None = None,
    measure: bool = True,
    session: ModelRunner | None = None,
) -> PipelineSettings:
    """The batch size and thread split to embed with ``model`` on this machine.

    Parameters
    ----------
    model : path of a featurebank ONNX model, or an open :class:`ModelRunner` (whose
        intra-op thread count is then fixed: the rest is chosen for it)
    device : ``auto``, ``cpu`` or ``cuda``, as :func:`~featurebank.embedder.session.open_model`
    decode_mode : the decode mode the images will be decoded in (decoding shares the CPU)
    batch_size, threads, workers : explicit settings; each one given is used as given
    progress : print what is measured on stderr (default: when stderr is a terminal; the
        measurement is logged at INFO either way)
    measure : False: never measure; without a cached choice, answer the unmeasured
        defaults (batch 16, every usable core for onnxruntime and for decoding), origin
        ``"default"`` (:func:`~featurebank.embed_into_store.embed_images` measures only for
        runs of at least :data:`MEASURE_MIN_IMAGES` images, which repay the seconds it takes)
    session : an open session of the model at ``model`` (a path) to measure with, for its
        thread count, instead of opening another

    Returns
    -------
    PipelineSettings. Nothing is measured when all three are given, or when
    ``<model>.tuning.json`` holds a choice made under this machine's :func:`tuning_key`;
    otherwise the grid is measured (a few seconds) and the result written there (a model in
    a read-only folder is measured again by each process, with a log line saying so).
    """
    check_decode_mode(decode_mode)
    for name, value in (("batch_size", batch_size), ("threads", threads), ("workers", workers)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ValueError(f"{name} must be a positive integer or None; got {name}={value!r}")
    fixed = isinstance(model, ModelRunner)
    if fixed:
        if threads is not None and threads != model.threads:
            raise ValueError(f"threads={threads} contradicts the open model, whose session runs {model.threads} "
                             "intra-op threads; pass the model's path, or open it with open_model(..., threads=N)")
        threads, session = model.threads, model
    if batch_size is not None and threads is not None and workers is not None:
        return PipelineSettings(batch_size, threads, workers, "explicit")
    path = session.path if fixed else check_model_file(model)
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}; got device={device!r}")
    provider = session.provider if session is not None else providers_for(device)[0]
    key = tuning_key(path, provider, decode_mode)
    entry = _cached(path, key)
    origin = "cached"
    if entry is None and not measure:
        cores = usable_cores(key["cores"], key["cpu_quota"])
        entry, origin = {"points": [{"threads": cores, "workers": cores, "batch_size": 16, "images_per_s": 0.0}]}, "default"
    elif entry is None:
        entry = _measure(path, device, decode_mode, key, session, fixed, progress)
        _store(path, key, entry)
        origin = "measured"
    best = _best(entry["points"], threads=threads, workers=workers)
    return PipelineSettings(
        batch_size if batch_size is not None else best["batch_size"],
        threads if threads is not None else best["threads"],
        workers if workers is not None else best["workers"],
        origin,
        bool(best.get("lower_priority", True)),
    )


def tune_for_run(model: str | os.PathLike[str] | ModelRunner, runner: ModelRunner, settings: PipelineSettings,
                 n_images: int, **explicit: Any) -> tuple[ModelRunner, PipelineSettings]:
    """The runner and settings for a run of ``n_images``, measuring first when nothing was cached
    (``settings.origin == "default"``) and the run is long enough to repay it
    (:data:`MEASURE_MIN_IMAGES`). ``model`` is what the caller was given (a path: the thread
    count is free, and ``runner`` is reopened when another wins; an open runner: its threads
    stay); ``explicit``: the caller's :func:`tune_pipeline` arguments."""
    if settings.origin != "default" or n_images < MEASURE_MIN_IMAGES:
        return runner, settings
    if isinstance(model, ModelRunner):
        return runner, tune_pipeline(runner, **{**explicit, "threads": None, "measure": True})
    settings = tune_pipeline(model, session=runner, **{**explicit, "measure": True})
    if settings.threads != runner.threads:
        runner = open_model(model, device=explicit.get("device", "auto"), threads=settings.threads)
    return runner, settings


def _best(points: Sequence[dict[str, Any]], **fixed: int | None) -> dict[str, Any]:
    """The fastest measured point among those agreeing with the fixed thread settings (all
    points when none agrees); within ``_TIE`` of the fastest, the largest batch."""
    agree = [p for p in points if all(v is None or p[k] == v for k, v in fixed.items())] or list(points)
    top = max(p["images_per_s"] for p in agree)
    near = [p for p in agree if p["images_per_s"] >= (1 - _TIE) * top]
    return max(near, key=lambda p: (p["batch_size"], p["images_per_s"]))


def _cached(path: str, key: dict[str, Any]) -> dict[str, Any] | None:
    try:
        data = json.loads(tuning_file(path).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != _FORMAT:
        return None
    for entry in data.get("entries", []):
        if isinstance(entry, dict) and entry.get("key") == key and entry.get("points"):
            return entry
    return None


def _store(path: str, key: dict[str, Any], entry: dict[str, Any]) -> None:
    file = tuning_file(path)
    try:
        data = json.loads(file.read_text())
        entries = [e for e in data.get("entries", []) if isinstance(e, dict) and e.get("key") != key]
    except (OSError, ValueError, AttributeError):
        entries = []
    entries = (entries + [entry])[-_MAX_ENTRIES:]
    try:
        write_bytes_atomic(file, json.dumps({"format": _FORMAT, "entries": entries}, indent=1).encode())
    except OSError as exc:
        log.info("featurebank: cannot cache the pipeline settings in %s (%s); they will be measured again next time",
                 file, exc.strerror or exc)


# ---------------------------------------------------------------------------------------
# the measurement
# ---------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def calibration_jpegs(seed: int = 0) -> tuple[bytes, ...]:
    """JPEG bytes (quality 90, 4:2:0) at a photo folder's sizes, with a photo's 1/f spectrum."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for w, h in _CALIBRATION_SIZES:
        # 1/f noise made small, resized up (smooth structure), plus fine grain (texture, sensor noise)
        sw, sh = max(8, w // 8), max(8, h // 8)
        f = np.sqrt(np.fft.fftfreq(sh)[:, None] ** 2 + np.fft.rfftfreq(sw)[None, :] ** 2)
        f[0, 0] = 1.0
        spectrum = (rng.normal(size=(3, sh, f.shape[1])) + 1j * rng.normal(size=(3, sh, f.shape[1]))) / f
        field = np.fft.irfft2(spectrum, s=(sh, sw)).transpose(1, 2, 0)
        field = (field - field.min()) / (np.ptp(field) + 1e-9) * 255
        img = Image.fromarray(field.astype(np.uint8)).resize((w, h), Image.Resampling.BICUBIC)
        grain = rng.integers(-8, 9, (h, w, 3), dtype=np.int16)
        arr = np.clip(np.asarray(img, np.int16) + grain, 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, "JPEG", quality=90, subsampling=2)
        out.append(buf.getvalue())
    return tuple(out)


def _grid(cores: int, on_cuda: bool) -> tuple[list[int], tuple[int, ...]]:
    """(intra-op thread counts, batch sizes) to try."""
    if on_cuda:  # the CPU runs only decoding and the odd op: batch size is what matters
        return [cores], GPU_BATCH_SIZES
    return sorted({cores, max(1, cores - 1), max(1, cores // 2)}, reverse=True), CPU_BATCH_SIZES


def _rate(runner: ModelRunner, images: Sequence[bytes], mode: str, batch: int, workers: int, seconds: float,
          lower: bool = True) -> float:
    """Images/s of decode_ahead + infer_batch on ``images`` (cycled), once the pipeline is full."""

    def batches():
        i = 0
        while True:
            yield [images[(i + k) % len(images)] for k in range(batch)]
            i += batch

    gen = decode_ahead(batches(), runner.card, mode=mode, workers=workers, lower_priority=lower and not runner.on_cuda)
    with closing(gen):
        infer_batch(runner, next(gen).decoded)  # the pipeline fills; onnxruntime sizes its buffers
        done, t0 = 0, time.perf_counter()
        for got in gen:
            infer_batch(runner, got.decoded)
            done += len(got.pixels)
            elapsed = time.perf_counter() - t0
            if elapsed >= seconds or done >= POINT_BATCHES * batch:
                return done / elapsed
    raise AssertionError("unreachable: the batches never end")  # pragma: no cover


def _model_rate(runner: ModelRunner, batch: int, seconds: float) -> float:
    """Images/s of the model alone on one uint8 batch, run until ``seconds`` or ``POINT_BATCHES``."""
    x = np.random.default_rng(0).integers(0, 256, (batch, *_hwc(runner.card)), dtype=np.uint8)
    done, t0 = 0, time.perf_counter()
    while True:
        infer_batch(runner, x)
        done += batch
        elapsed = time.perf_counter() - t0
        if elapsed >= seconds or done >= POINT_BATCHES * batch:
            return done / elapsed


def _measure(path: str, device: str, decode_mode: str, key: dict[str, Any], session: ModelRunner | None,
             fixed: bool, progress: bool | None) -> dict[str, Any]:
    """Two steps, so that a few seconds suffice: (1) the model alone for each intra-op thread
    count and batch size picks each thread count's batch size; (2) the whole pipeline, decoding
    real-sized JPEGs, for each thread count with its batch size and the decode threads (all
    cores, and one per core onnxruntime leaves free); then, at the best of those, the decode
    threads at a lower priority or at inference's. Each step in interleaved rounds."""
    if progress is None:
        progress = sys.stderr.isatty()
    t_start = time.perf_counter()
    images = calibration_jpegs()
    cores = usable_cores(key["cores"], key["cpu_quota"])
    on_cuda = key["provider"] == "CUDAExecutionProvider"
    thread_counts, batch_sizes = _grid(cores, on_cuda)
    if fixed:
        thread_counts = [session.threads]
    runners = {t: session if session is not None and t == session.threads else open_model(path, device=device, threads=t)
               for t in thread_counts}
    card = runners[thread_counts[0]].card
    split = [(t, w) for t in thread_counts for w in dict.fromkeys((cores, max(1, cores - t))) if not (on_cuda and w != cores)]
    say = _Say(progress, ROUNDS * (len(thread_counts) * len(batch_sizes) + len(split) + (0 if on_cuda else 2)),
               card.backbone, decode_mode, path)
    for t in thread_counts:
        infer_batch(runners[t], np.zeros((max(batch_sizes), *_hwc(card)), np.uint8))  # onnxruntime sizes its buffers
    alone: dict[tuple[int, int], list[float]] = {}
    for _ in range(ROUNDS):
        for t in thread_counts:
            for b in batch_sizes:
                alone.setdefault((t, b), []).append(_model_rate(runners[t], b, POINT_SECONDS / 2))
                say.line(f"model alone, {t} onnxruntime threads, batch {b}", alone[(t, b)][-1])
    model_alone = {tb: float(np.median(v)) for tb, v in alone.items()}
    batch_of = {t: max(batch_sizes, key=lambda b: model_alone[(t, b)]) for t in thread_counts}
    rates: dict[tuple[int, int, bool], list[float]] = {(t, w, True): [] for t, w in split}

    def measure(points: Sequence[tuple[int, int, bool]]) -> None:
        for _ in range(ROUNDS):  # rounds interleaved: a burst of load elsewhere hits every point alike
            for t, w, lower in points:
                rates.setdefault((t, w, lower), []).append(
                    _rate(runners[t], images, decode_mode, batch_of[t], w, POINT_SECONDS, lower))
                say.line(f"pipeline, {t} onnxruntime threads, {w} decode threads{'' if lower else ' (same priority)'}, "
                         f"batch {batch_of[t]}", rates[(t, w, lower)][-1])

    measure(list(rates))
    if not on_cuda:  # then the decode threads' priority, at the best split, against itself again
        t, w, _ = max(rates, key=lambda k: float(np.median(rates[k])))
        measure([(t, w, True), (t, w, False)])
    points = [{"threads": t, "workers": w, "batch_size": batch_of[t], "lower_priority": lower,
               "images_per_s": round(float(np.median(v)), 2), "runs": [round(x, 2) for x in v]}
              for (t, w, lower), v in rates.items()]
    seconds = time.perf_counter() - t_start
    best = _best(points)
    say.done(best, seconds)
    return {"key": key, "points": points,
            "model_alone": [{"threads": t, "batch_size": b, "images_per_s": round(r, 2)} for (t, b), r in model_alone.items()],
            "seconds": round(seconds, 2), "measured_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def _hwc(card: ModelCard) -> tuple[int, int, int]:
    c, h, w = card.preprocessing.input_size
    return h, w, c


class _Say:
    """Progress of a measurement: stderr when asked, the log always."""

    def __init__(self, enabled: bool, total: int, backbone: str, mode: str, path: str) -> None:
        self.enabled, self.total, self.n = enabled, total, 0
        self._line(f"featurebank: measuring the batch size and thread split for {backbone} ({mode} decoding) on "
                   f"this machine, once (cached in {tuning_file(path)})")

    def _line(self, text: str) -> None:
        log.info("%s", text)
        if self.enabled:
            print(text, file=sys.stderr, flush=True)

    def line(self, what: str, rate: float) -> None:
        self.n += 1
        self._line(f"  [{self.n}/{self.total}] {what}: {rate:.1f} images/s")

    def done(self, best: dict[str, Any], seconds: float) -> None:
        self._line(f"featurebank: chose batch {best['batch_size']}, {best['threads']} onnxruntime threads, "
                   f"{best['workers']} decode threads{'' if best.get('lower_priority', True) else ' (same priority)'} "
                   f"({best['images_per_s']:.1f} images/s) in {seconds:.1f} s")
