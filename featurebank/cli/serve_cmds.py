"""`featurebank serve`: a thin shell over featurebank.service.serve."""

from __future__ import annotations

import argparse
import logging
import sys

from featurebank.artifact import DECODE_MODES
from featurebank.embedder.devices import DEFAULT_DEVICE, DEVICES


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever sys.stderr is at each record (not the stream of the moment it was
    made), so a redirected or replaced stderr never leaves it writing to a closed file."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def register(sub: argparse._SubParsersAction, formatter_class: type) -> None:
    p = sub.add_parser(
        "serve", help="HTTP embedding service with a web page (embed, classify, search)", formatter_class=formatter_class,
        description="Serve a featurebank model over HTTP (FastAPI + uvicorn): POST /v1/embed, /v1/classify, /v1/search, "
        "GET /healthz, /readyz, /metrics, and a web page at /. Concurrent requests are batched for the model. "
        "OpenAPI spec at /openapi.json. Needs the `service` extra.",
        epilog="examples:\n"
        "  featurebank serve --model model.onnx --classifier textures.fbclf --index photos.idx\n"
        "  FEATUREBANK_API_KEY=s3cret featurebank serve --model model.onnx --host 0.0.0.0 --port 8080\n"
        "  curl --data-binary @cat.jpg -H 'Content-Type: image/jpeg' localhost:8000/v1/classify",
    )
    p.add_argument("--model", required=True, metavar="MODEL.onnx", help="a featurebank ONNX model")
    p.add_argument("--classifier", metavar="FILE", default=None, help="classifier file from featurebank (enables /v1/classify)")
    p.add_argument("--index", metavar="DIR", default=None, help="similarity index directory (enables /v1/search and thumbnails)")
    p.add_argument("--store", metavar="DIR", default=None,
                   help="a store with this model's vectors: the page lists `featurebank audit`'s suspects of its "
                   "labelled images (GET /v1/audit)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1; 0.0.0.0 for all)")
    p.add_argument("--port", type=int, default=8000, help="port (default: 8000)")
    p.add_argument("--api-key", default=None, metavar="KEY",
                   help="require header X-API-Key: KEY (or Authorization: Bearer KEY) on every route but /healthz, "
                   "/readyz and the page, /openapi.json and /docs included "
                   "(default: env FEATUREBANK_API_KEY; prefer the variable: arguments show in `ps`)")
    p.add_argument("--expose-paths", action="store_true",
                   help="search results carry each indexed file's absolute server path (default: only its name "
                   "relative to the folder holding all indexed files)")
    g = p.add_argument_group("batching and limits")
    g.add_argument("--max-batch", type=int, default=32, help="images per inference batch (default: 32)")
    g.add_argument("--max-wait-ms", type=float, default=5.0, help="longest wait for a batch to fill (default: 5)")
    g.add_argument("--queue-size", type=int, default=256, help="images admitted at once; beyond: 503 + Retry-After (default: 256)")
    g.add_argument("--max-images", type=int, default=64, help="images per request; beyond: 413 (default: 64)")
    g.add_argument("--max-body-mb", type=float, default=32.0, help="request body limit in MiB; beyond: 413 (default: 32)")
    g.add_argument("--max-pixels", type=int, default=None, help="pixels per image; beyond: 413 (default: 89478485)")
    g.add_argument("--max-request-pixels", type=int, default=None,
                   help="pixels of all images of one request, read from their headers before decoding; beyond: 413. "
                   "Also the most pixels decoded at once, which bounds memory (default: 268435456)")
    g.add_argument("--timeout-s", type=float, default=30.0, help="per-request time limit; beyond: 504 (default: 30)")
    g.add_argument("--header-timeout-s", type=float, default=10.0,
                   help="time a client has to send a request's headers; beyond: 408 and closed (default: 10)")
    g.add_argument("--body-timeout-s", type=float, default=30.0,
                   help="time a client has to send a request's body after its headers; beyond: 408 and closed "
                   "(default: 30)")
    g.add_argument("--max-connections", type=int, default=512,
                   help="open connections served at once; a request on one more gets 503 (default: 512)")
    g.add_argument("--cache-size", type=int, default=1024, help="embeddings kept in the content-hash LRU cache (default: 1024)")
    g.add_argument("--graceful-timeout-s", type=float, default=None,
                   help="on SIGTERM/SIGINT, how long requests in flight may take to finish; those still running "
                   "then get 503 + Retry-After, as do later ones (default: --timeout-s)")
    m = p.add_argument_group("model")
    m.add_argument("--output", default=None, metavar="NAME", help="model output to serve (default: the only one)")
    m.add_argument("--decode-mode", choices=DECODE_MODES, default=None,
                   help="default: the mode the classifier/index were built with, else fast")
    m.add_argument("--device", choices=DEVICES, default=DEFAULT_DEVICE,
                   help="auto: CUDA if it runs, else CPU (said on stderr); cuda: fail if CUDA does not run")
    m.add_argument("--threads", type=int, default=None, help="onnxruntime threads (default: all cores)")
    m.add_argument("--decode-workers", type=int, default=None, help="decode threads (default: all cores)")
    p.add_argument("--log-level", choices=("debug", "info", "warning", "error"), default="info",
                   help="the least severe log messages printed")
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    import sys

    from featurebank.errors import FeaturebankError

    try:
        from featurebank.service import ServiceConfig, serve
        from featurebank.service.config import api_key_from_env
    except ImportError as exc:
        print(f"featurebank: error: the service needs the `service` extra ({exc.name} is missing): "
              "pip install 'featurebank[service]'", file=sys.stderr)
        return 2
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), format="%(levelname)s: %(message)s",
                        handlers=[_StderrHandler()])
    extra = {name: getattr(args, name) for name in ("max_pixels", "max_request_pixels")
             if getattr(args, name) is not None}
    try:
        config = ServiceConfig(
            max_batch=args.max_batch, max_wait_ms=args.max_wait_ms, queue_size=args.queue_size,
            max_images=args.max_images, max_body_mb=args.max_body_mb, timeout_s=args.timeout_s,
            header_timeout_s=args.header_timeout_s, body_timeout_s=args.body_timeout_s,
            max_connections=args.max_connections, expose_paths=args.expose_paths,
            api_key=args.api_key or api_key_from_env(), decode_mode=args.decode_mode, output=args.output,
            cache_size=args.cache_size, device=args.device, threads=args.threads,
            decode_workers=args.decode_workers, **extra,
        )
        serve(args.model, classifier=args.classifier, index=args.index, config=config, host=args.host,
              port=args.port, graceful_timeout_s=args.graceful_timeout_s, log_level=args.log_level, store=args.store)
    except ValueError as exc:
        if isinstance(exc, FeaturebankError):
            raise
        print(f"featurebank: error: {exc}", file=sys.stderr)
        return 2
    return 0
