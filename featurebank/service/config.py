"""The service's settings: one frozen dataclass, validated where it is built."""

from __future__ import annotations

import os
from dataclasses import dataclass, fields

from featurebank.artifact import DECODE_MODES
from featurebank.embedder.devices import DEFAULT_DEVICE, DEVICES
from featurebank.decoding import DEFAULT_MAX_PIXELS

__all__ = ["ServiceConfig", "API_KEY_ENV", "DEFAULT_MAX_REQUEST_PIXELS"]

#: Default of :attr:`ServiceConfig.max_request_pixels`: 2**28, three images at the largest
#: size ``max_pixels`` allows by default (about 1 GiB of RGBA while decoding).
DEFAULT_MAX_REQUEST_PIXELS = 2**28

#: Environment variable read by ``featurebank serve`` when ``--api-key`` is not given.
API_KEY_ENV = "FEATUREBANK_API_KEY"


@dataclass(frozen=True)
class ServiceConfig:
    """Limits and tuning of the embedding service.

    Attributes
    ----------
    max_batch : images per inference batch (the batcher never runs more at once)
    max_wait_ms : how long the first image of a batch may wait for others to join it
    queue_size : images admitted (waiting for decode or inference) before new requests get
        503 with ``Retry-After``
    max_images : images per request (413 beyond)
    max_body_mb : request body size limit in MiB (413 beyond), checked while reading
    max_pixels : images with more pixels are refused (413) before their pixels are decoded
    max_request_pixels : pixels of all the images of one request together, read from their
        headers before anything is decoded (413 beyond); also the most pixels decoded at once
        across all requests, which bounds the decoders' memory (about 4 bytes a pixel)
    timeout_s : a request not answered within this many seconds gets 504; on SIGTERM, how long
        the requests in flight may take to finish (503 with ``Retry-After`` after that)
    header_timeout_s : a client must send a request's headers within this many seconds of
        connecting (or of starting its next request on a kept-alive connection): 408, closed
    body_timeout_s : a client must send the whole request body within this many seconds of
        its headers: 408, closed (a 32 MiB body then needs about 1.1 MB/s)
    max_connections : open connections (and requests in progress) at most; a request arriving
        beyond gets 503
    api_key : when set, every route but ``/``, its static files, ``/healthz`` and
        ``/readyz`` (``/openapi.json``, ``/docs`` and ``/redoc`` included) needs header
        ``X-API-Key: <key>`` or ``Authorization: Bearer <key>``
    expose_paths : search results carry the absolute server path of each indexed file; by
        default only its name relative to the folder that holds all indexed files
    decode_mode : ``"fast"``/``"exact"``; None: the mode the classifier or index was built
        with, else ``"fast"`` (the embedder's default)
    output : model output to serve (name or layer); None: the only one
    cache_size : embeddings kept in the content-hash LRU cache (0 disables it)
    decode_workers : decode threads; None: the cores this process may use
    threads : onnxruntime intra-op threads; None: the cores this process may use
    device : ``auto``, ``cpu`` or ``cuda`` (see :func:`featurebank.embedder.session.open_model`)
    top_k : default number of neighbours for ``/v1/search``
    max_k : largest ``k`` a client may ask for
    """

    max_batch: int = 32
    max_wait_ms: float = 5.0
    queue_size: int = 256
    max_images: int = 64
    max_body_mb: float = 32.0
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_request_pixels: int = DEFAULT_MAX_REQUEST_PIXELS
    timeout_s: float = 30.0
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    max_connections: int = 512
    api_key: str | None = None
    expose_paths: bool = False
    decode_mode: str | None = None
    output: str | None = None
    cache_size: int = 1024
    decode_workers: int | None = None
    threads: int | None = None
    device: str = DEFAULT_DEVICE
    top_k: int = 12
    max_k: int = 100

    def __post_init__(self) -> None:
        for name in ("max_batch", "queue_size", "max_images", "max_pixels", "max_request_pixels", "max_connections",
                     "top_k", "max_k"):
            _positive_int(name, getattr(self, name))
        for name in ("decode_workers", "threads"):
            if getattr(self, name) is not None:
                _positive_int(name, getattr(self, name))
        if isinstance(self.cache_size, bool) or not isinstance(self.cache_size, int) or self.cache_size < 0:
            raise ValueError(f"cache_size must be an integer >= 0 (0 disables the cache); got cache_size={self.cache_size!r}")
        for name in ("max_body_mb", "timeout_s", "header_timeout_s", "body_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{name} must be a positive number; got {name}={value!r}")
        if isinstance(self.max_wait_ms, bool) or not isinstance(self.max_wait_ms, (int, float)) or self.max_wait_ms < 0:
            raise ValueError(f"max_wait_ms must be a number >= 0; got max_wait_ms={self.max_wait_ms!r}")
        if self.queue_size < self.max_images:
            raise ValueError(
                f"queue_size ({self.queue_size}) must be at least max_images ({self.max_images}), "
                "or a request of max_images images could never be admitted"
            )
        if self.max_request_pixels < self.max_pixels:
            raise ValueError(
                f"max_request_pixels ({self.max_request_pixels:,}) must be at least max_pixels ({self.max_pixels:,}), "
                "or an image under max_pixels could never be served; raise max_request_pixels (--max-request-pixels)"
            )
        if not isinstance(self.expose_paths, bool):
            raise ValueError(f"expose_paths must be True or False; got expose_paths={self.expose_paths!r}")
        if self.decode_mode is not None and self.decode_mode not in DECODE_MODES:
            raise ValueError(f"decode_mode must be one of {', '.join(DECODE_MODES)} or None; got {self.decode_mode!r}")
        if self.api_key is not None and (not isinstance(self.api_key, str) or not self.api_key.strip()):
            raise ValueError("api_key must be a non-empty string or None")
        if self.device not in DEVICES:
            raise ValueError(f"device must be one of {', '.join(DEVICES)}; got device={self.device!r}")
        if self.top_k > self.max_k:
            raise ValueError(f"top_k ({self.top_k}) must not exceed max_k ({self.max_k})")

    @property
    def max_body_bytes(self) -> int:
        return int(self.max_body_mb * 1024 * 1024)

    @property
    def decode_threads(self) -> int:
        from featurebank.embedder.session import physical_cores

        return self.decode_workers or physical_cores()

    def public_dict(self) -> dict:
        """The settings without the API key (for logs and ``/v1/info``)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["api_key"] = "set" if self.api_key else None
        return out


def _positive_int(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer; got {name}={value!r}")


def api_key_from_env() -> str | None:
    value = os.environ.get(API_KEY_ENV, "").strip()
    return value or None
