"""Prometheus metrics in the text exposition format (version 0.0.4), without a client library.

Only what the service records: counters, gauges and histograms with fixed label names.
All updates take one lock, so the event loop and worker threads may both record.

>>> m = Metrics()
>>> m.batch_size.observe(8)
>>> "featurebank_batch_size_bucket{le=\\"8\\"} 1" in m.render()
True
"""

from __future__ import annotations

import bisect
import math
import threading
from typing import Iterable, Sequence

__all__ = ["Metrics", "Counter", "Gauge", "Histogram", "CONTENT_TYPE"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Latency buckets in seconds: 0.5 ms .. 30 s.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: Sequence[str], values: Sequence[str], extra: str = "") -> str:
    parts = [f'{n}="{_escape(str(v))}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _num(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    if float(value).is_integer():
        return str(int(value))
    return repr(float(value))


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labelnames: Sequence[str], lock: threading.Lock) -> None:
        self.name, self.help, self.labelnames, self._lock = name, help, tuple(labelnames), lock

    def _key(self, labels: dict[str, str]) -> tuple[str, ...]:
        if set(labels) != set(self.labelnames):
            raise ValueError(f"{self.name} takes labels {self.labelnames}; got {tuple(labels)}")
        return tuple(str(labels[n]) for n in self.labelnames)

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self._values: dict[tuple[str, ...], float] = {} if self.labelnames else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(self._key(labels), 0.0)

    def lines(self) -> Iterable[str]:
        for key, v in sorted(self._values.items()):
            yield f"{self.name}{_labels(self.labelnames, key)} {_num(v)}"


class Gauge(Counter):
    kind = "gauge"

    def set(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        with self._lock:
            self._values[key] = float(value)


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name: str, help: str, labelnames: Sequence[str], lock: threading.Lock, buckets: Sequence[float]) -> None:
        super().__init__(name, help, labelnames, lock)
        self.buckets = tuple(sorted(float(b) for b in buckets))
        # per label set: [count per bucket (non-cumulative, +Inf last)], sum
        self._series: dict[tuple[str, ...], tuple[list[int], list[float]]] = {}

    def observe(self, value: float, **labels: str) -> None:
        key = self._key(labels)
        i = bisect.bisect_left(self.buckets, value)  # first bucket with le >= value
        with self._lock:
            counts, total = self._series.setdefault(key, ([0] * (len(self.buckets) + 1), [0.0]))
            counts[i] += 1
            total[0] += value

    def count(self, **labels: str) -> int:
        series = self._series.get(self._key(labels))
        return sum(series[0]) if series else 0

    def sum(self, **labels: str) -> float:
        series = self._series.get(self._key(labels))
        return series[1][0] if series else 0.0

    def lines(self) -> Iterable[str]:
        for key, (counts, total) in sorted(self._series.items()):
            running = 0
            for le, c in zip((*self.buckets, math.inf), counts):
                running += c
                yield f"{self.name}_bucket{_labels(self.labelnames, key, f'le={chr(34)}{_num(le)}{chr(34)}')} {running}"
            yield f"{self.name}_sum{_labels(self.labelnames, key)} {_num(total[0])}"
            yield f"{self.name}_count{_labels(self.labelnames, key)} {running}"


class Metrics:
    """Every metric the service exports; ``render()`` gives the ``/metrics`` text."""

    def __init__(self, max_batch: int = 32) -> None:
        self._lock = threading.Lock()
        lk = self._lock
        self.requests = Counter("featurebank_requests_total", "HTTP requests answered, by route and status code.",
                                ("route", "status"), lk)
        self.latency = Histogram("featurebank_request_duration_seconds", "Time to answer a request, by route.",
                                 ("route",), lk, LATENCY_BUCKETS)
        self.stage = Histogram("featurebank_stage_duration_seconds",
                               "Time per stage: decode (per image, in the decode pool), queue (per image, from "
                               "decoded to its batch starting), infer (per batch).", ("stage",), lk, LATENCY_BUCKETS)
        sizes = sorted({1, 2, 4, 8, 16, 32, 64, 128, max_batch})
        self.batch_size = Histogram("featurebank_batch_size", "Images per inference batch.", (), lk,
                                    [s for s in sizes if s <= max_batch])
        self.images = Counter("featurebank_images_total", "Images embedded by the model (cache misses).", (), lk)
        self.cache_hits = Counter("featurebank_cache_hits_total", "Images answered from the embedding cache.", (), lk)
        self.cache_misses = Counter("featurebank_cache_misses_total", "Images not found in the embedding cache.", (), lk)
        self.cache_entries = Gauge("featurebank_cache_entries", "Embeddings held in the cache.", (), lk)
        self.queue_depth = Gauge("featurebank_queue_depth", "Images admitted and not yet embedded (decoding or waiting).",
                                 (), lk)
        self.rejected = Counter("featurebank_rejected_total", "Requests refused with 503 because the queue was full.",
                                (), lk)
        self.in_flight = Gauge("featurebank_requests_in_flight", "Requests being handled now.", (), lk)
        self._all = (self.requests, self.latency, self.stage, self.batch_size, self.images, self.cache_hits,
                     self.cache_misses, self.cache_entries, self.queue_depth, self.rejected, self.in_flight)

    def render(self) -> str:
        with self._lock:
            out: list[str] = []
            for metric in self._all:
                out.extend(metric.header())
                out.extend(metric.lines())
        return "\n".join(out) + "\n"
