"""The service's Prometheus metrics, kept with ``prometheus-client``.

Each :class:`Metrics` owns its own ``CollectorRegistry`` (not the process-wide default one),
so several apps in one process (tests, or two models served side by side) never share or
collide on series. ``prometheus-client`` takes a lock per series, so the event loop and the
decode / inference threads may all record.

>>> m = Metrics(max_batch=8)
>>> m.batch_size.observe(8)
>>> m.sample("featurebank_batch_size_bucket", le="8.0")
1.0
>>> body, content_type = m.exposition()
>>> content_type
'text/plain; version=0.0.4; charset=utf-8'
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

__all__ = ["Metrics", "LATENCY_BUCKETS"]

#: Latency buckets in seconds: 0.5 ms .. 30 s.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    """Every metric the service exports, in a registry of its own.

    Parameters
    ----------
    max_batch : the largest inference batch; the batch-size histogram's top bucket
    """

    def __init__(self, max_batch: int = 32) -> None:
        self.registry = r = CollectorRegistry(auto_describe=True)
        self.requests = Counter("featurebank_requests_total", "HTTP requests answered, by route and status code.",
                                ("route", "status"), registry=r)
        self.latency = Histogram("featurebank_request_duration_seconds", "Time to answer a request, by route.",
                                 ("route",), registry=r, buckets=LATENCY_BUCKETS)
        self.stage = Histogram("featurebank_stage_duration_seconds",
                               "Time per stage: decode (per image, in the decode pool), queue (per image, from "
                               "decoded to its batch starting), infer (per batch).", ("stage",), registry=r,
                               buckets=LATENCY_BUCKETS)
        sizes = sorted({1, 2, 4, 8, 16, 32, 64, 128, max_batch})
        self.batch_size = Histogram("featurebank_batch_size", "Images per inference batch.", registry=r,
                                    buckets=[s for s in sizes if s <= max_batch])
        self.images = Counter("featurebank_images_total", "Images embedded by the model (cache misses).", registry=r)
        self.cache_hits = Counter("featurebank_cache_hits_total", "Images answered from the embedding cache.", registry=r)
        self.cache_misses = Counter("featurebank_cache_misses_total", "Images not found in the embedding cache.",
                                    registry=r)
        self.cache_entries = Gauge("featurebank_cache_entries", "Embeddings held in the cache.", registry=r)
        self.queue_depth = Gauge("featurebank_queue_depth", "Images admitted and not yet embedded (decoding or waiting).",
                                 registry=r)
        self.rejected = Counter("featurebank_rejected_total", "Requests refused with 503 because the queue was full.",
                                registry=r)
        self.in_flight = Gauge("featurebank_requests_in_flight", "Requests being handled now.", registry=r)

    def sample(self, name: str, **labels: str) -> float:
        """The current value of one exposed sample (0.0 where it has not been recorded yet).

        ``name`` is the sample's name as scraped (``featurebank_requests_total``,
        ``featurebank_stage_duration_seconds_count``, ...).
        """
        value = self.registry.get_sample_value(name, labels)
        return 0.0 if value is None else value

    def exposition(self, accept: str | None = None) -> tuple[bytes, str]:
        """(body, content type) of a ``/metrics`` answer for the request's ``Accept`` header:
        the Prometheus text format 0.0.4, or OpenMetrics where the scraper asks for it."""
        encode, content_type = choose_encoder(accept or "")
        return encode(self.registry), content_type
