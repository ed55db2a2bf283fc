"""The HTTP application: routes, request parsing, limits, auth and metrics around a ServiceEngine.

Build it with :func:`create_app` and serve it with any ASGI server (``featurebank serve``
uses uvicorn)::

    from featurebank.service import ServiceConfig, create_app
    app = create_app("model.onnx", classifier="textures.fbclf", index="photos.idx",
                     config=ServiceConfig(max_batch=32, api_key="s3cret"))

Routes (OpenAPI at ``/openapi.json``, interactive docs at ``/docs``; with an API key set,
these need it too):

=========================  ================================================================
``POST /v1/embed``         vectors of one or many images (JSON, or raw float32 with
                           ``Accept: application/octet-stream``)
``POST /v1/classify``      labels and probabilities (needs ``classifier``)
``POST /v1/search``        nearest indexed images of the posted image(s) (needs ``index``)
``GET /v1/search?id=``     nearest indexed images of an indexed image
``GET /v1/classify?id=``   labels of an indexed image (its vector from the index's store)
``GET /v1/images/{id}/thumbnail``  JPEG thumbnail of an indexed image, by id only
``GET /v1/info``           what is served and the limits
``GET /metrics``           Prometheus text
``GET /healthz``           the process answers
``GET /readyz``            the model is loaded and warmed up (503 before, and while stopping)
``GET /``                  the web page (static HTML + JS)
=========================  ================================================================

Images come as the raw request body (``Content-Type: image/jpeg``, ``image/png``, ... or
``application/octet-stream``) or as files of a ``multipart/form-data`` body (any field
name; several files give several images, in order). The service never opens a path a client
names: form fields that are not files are refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Query, Request, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect
from starlette.exceptions import HTTPException as StarletteHTTPException

from featurebank import __version__
from featurebank.service.config import ServiceConfig
from featurebank.service.engine import RequestRejected, ServiceEngine
from featurebank.service.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE

__all__ = ["create_app"]

log = logging.getLogger("featurebank.service")

STATIC_DIR = Path(__file__).with_name("static")
_BINARY = "application/octet-stream"
_RAW_TYPES = ("image/", _BINARY)
# Content-Length above the limit: read and discard up to this much before answering 413, so
# that a client still writing its body reads the answer instead of a reset connection.
_DRAIN_LIMIT = 64 * 1024 * 1024


# ---------------------------------------------------------------------------- response models


class Problem(BaseModel):
    detail: str = Field(description="what is wrong and how to fix it")


class Embedding(BaseModel):
    key: str = Field(description="sha256 hex of the image bytes (the store's content key)")
    cached: bool = Field(description="answered from the embedding cache")
    vector: list[float]


class EmbedResponse(BaseModel):
    model: str
    output: str
    dim: int
    decode_mode: str
    space: str = Field(description="vector-space fingerprint (output + decode mode)")
    embeddings: list[Embedding]


class LabelProbability(BaseModel):
    label: str
    probability: float


class Prediction(BaseModel):
    key: str
    label: str
    probabilities: list[LabelProbability] = Field(description="every class, most probable first")


class ClassifyResponse(BaseModel):
    predictions: list[Prediction]


class Neighbour(BaseModel):
    id: str = Field(description="indexed id (content key)")
    score: float = Field(description="cosine similarity (larger is closer) or squared L2 distance (smaller is closer)")
    rank: int
    name: str | None = Field(description="the indexed file, relative to the folder holding every indexed file "
                                         "(null where the store records no file)")
    path: str | None = Field(description="absolute path of the indexed file on the server; null unless the "
                                         "server runs with --expose-paths")
    thumbnail_url: str | None


class SearchResult(BaseModel):
    key: str = Field(description="content key of the query image (or the queried id)")
    neighbours: list[Neighbour]


class SearchResponse(BaseModel):
    metric: str
    results: list[SearchResult]


class Health(BaseModel):
    status: str


_IMAGE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "one image as the raw body, or several as multipart/form-data files (any field name)",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"image": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                    "required": ["image"],
                }
            },
            **{t: {"schema": {"type": "string", "format": "binary"}}
               for t in ("image/jpeg", "image/png", "image/webp", _BINARY)},
        },
    }
}


def _problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    text = {
        400: "no image, or a malformed body",
        401: "missing or wrong API key (header X-API-Key or Authorization: Bearer)",
        404: "not loaded / not in the index",
        406: "the Accept header asks for a format this route cannot give",
        413: "body, image count or image pixels over the limit",
        415: "the body is neither an image nor multipart/form-data",
        422: "an image cannot be decoded, or a parameter is invalid",
        503: "queue full or shutting down; retry after Retry-After seconds",
        504: "not answered within the server's timeout",
    }
    return {c: {"model": Problem, "description": text[c]} for c in codes}


# ---------------------------------------------------------------------------- middleware


class _BodyTooLarge(Exception):
    pass


class _BodyTimeout(Exception):
    pass


class _Drain:
    """Shutdown of the HTTP layer, begun by the server on SIGTERM/SIGINT (:func:`make_server`).

    Requests in flight at that moment get ``grace_s`` seconds to finish; any still running
    then, and any that arrive later, get 503 with ``Retry-After`` (never a 500).
    """

    def __init__(self) -> None:
        self.draining = False
        self.running: set[asyncio.Timeout] = set()

    def begin(self, grace_s: float) -> None:
        """Called on the event loop when the server starts to shut down."""
        # the engine is stopped later, by the app's shutdown, once these requests are done
        self.draining = True
        deadline = asyncio.get_running_loop().time() + grace_s
        for timeout in self.running:
            timeout.reschedule(deadline)
        log.info("shutting down: %d request(s) in flight get %g s to finish", len(self.running), grace_s)


_SHUTTING_DOWN = "the service is shutting down; retry the request (on another instance, or once it is back)"


class _Limits:
    """Pure ASGI middleware: body size (413) and body time (408) limits, shutdown (503),
    request metrics, in-flight gauge.

    Pure ASGI (not BaseHTTPMiddleware) so that the body is counted and timed while it streams
    in. The time to send the headers is bounded by the server (:mod:`featurebank.service.server`).
    """

    def __init__(self, app, engine: ServiceEngine, drain: _Drain) -> None:
        self.app, self.engine, self.drain = app, engine, drain

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        config, metrics = self.engine.config, self.engine.metrics
        limit = config.max_body_bytes
        started = time.perf_counter()
        status = {"code": 500}

        async def send_status(message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
            await send(message)

        # the whole body must be in within body_timeout_s of the headers; reads after it
        # (waiting for a disconnect while a response streams) are not timed
        loop = asyncio.get_running_loop()
        body_deadline = loop.time() + config.body_timeout_s
        body_done = False

        async def timed_receive():
            nonlocal body_done
            if body_done:
                return await receive()
            try:
                async with asyncio.timeout_at(body_deadline):
                    message = await receive()
            except TimeoutError:
                raise _BodyTimeout(
                    f"the request body was not received within {config.body_timeout_s:g} s (server --body-timeout-s); "
                    "send it faster, or send fewer or smaller images per request") from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                body_done = True
            return message

        declared = _content_length(scope)
        metrics.in_flight.inc()
        shutdown = asyncio.timeout(None)  # rescheduled by _Drain.begin
        self.drain.running.add(shutdown)
        try:
            if self.drain.draining:
                await _send_problem(send_status, 503, _SHUTTING_DOWN, {"Retry-After": "1", "Connection": "close"})
                return
            async with shutdown:
                if declared is not None and declared > limit:
                    # read what the client is still sending (for a while), so that it reads
                    # the 413 instead of a reset connection
                    with contextlib.suppress(_BodyTimeout):
                        await _drain(timed_receive, _DRAIN_LIMIT)
                    await _send_problem(send_status, 413, _too_large(declared, limit), {"Connection": "close"})
                    return
                received = 0

                async def counting_receive():
                    nonlocal received
                    message = await timed_receive()
                    if message["type"] == "http.request":
                        received += len(message.get("body", b""))
                        if received > limit:
                            if message.get("more_body", False):
                                with contextlib.suppress(_BodyTimeout):
                                    await _drain(timed_receive, _DRAIN_LIMIT)
                            raise _BodyTooLarge(_too_large(received, limit, streaming=True))
                    return message

                await self.app(scope, counting_receive, send_status)
        except _BodyTimeout as exc:
            log.info("%s %s: %s", scope["method"], scope["path"], exc)
            if not _started(status):
                await _send_problem(send_status, 408, str(exc), {"Connection": "close"})
        except ClientDisconnect:
            # the client went away before its request was complete: nothing to answer, and
            # not an error of the server
            log.info("%s %s: the client disconnected before sending the whole request", scope["method"], scope["path"])
            status["code"] = 499
        except TimeoutError:
            if not shutdown.expired():
                raise
            log.warning("%s %s: still running when the shutdown grace period ended; answered 503",
                        scope["method"], scope["path"])
            if not _started(status):
                await _send_problem(send_status, 503, _SHUTTING_DOWN, {"Retry-After": "1", "Connection": "close"})
        finally:
            self.drain.running.discard(shutdown)
            metrics.in_flight.inc(-1)
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            metrics.requests.inc(route=label, status=str(status["code"]))
            metrics.latency.observe(time.perf_counter() - started, route=label)


def _content_length(scope) -> int | None:
    for name, value in scope.get("headers", ()):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _too_large(size: int, limit: int, streaming: bool = False) -> str:
    what = f"more than {limit:,} bytes" if streaming else f"{size:,} bytes"
    return (f"request body is {what}; the limit is {limit:,} bytes ({limit / 2**20:g} MiB, server --max-body-mb): "
            "send fewer or smaller images per request")


async def _drain(receive, cap: int) -> None:
    seen = 0
    while seen <= cap:
        message = await receive()
        if message["type"] != "http.request":
            return
        seen += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


def _started(status: dict) -> bool:
    return "started" in status


async def _send_problem(send, status: int, detail: str, headers: dict[str, str] | None = None) -> None:
    response = JSONResponse({"detail": detail}, status_code=status, headers=headers)
    await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
    await send({"type": "http.response.body", "body": response.body})


# ---------------------------------------------------------------------------- request helpers


def _accept_binary(request: Request) -> bool:
    """True when the client prefers raw float32 (``application/octet-stream``) to JSON."""
    header = request.headers.get("accept", "")
    if not header.strip():
        return False
    best: dict[str, float] = {}
    for part in header.split(","):
        fields = [f.strip() for f in part.split(";")]
        media, q = fields[0].lower(), 1.0
        for f in fields[1:]:
            if f.startswith("q="):
                try:
                    q = float(f[2:])
                except ValueError:
                    q = 0.0
        best[media] = max(q, best.get(media, 0.0))
    wildcard = max(best.get("*/*", 0.0), best.get("application/*", 0.0))
    json_q = best.get("application/json", wildcard)
    binary_q = best.get(_BINARY, wildcard)
    if json_q <= 0 and binary_q <= 0:
        raise RequestRejected(406, f"Accept: {header!r} allows neither application/json nor {_BINARY}")
    return binary_q > json_q


def _client_name(name: str | None, i: int) -> str:
    if not name:
        return f"image {i}"
    return f"image {i} ({name[:80]!r})"


async def _read_images(request: Request, config: ServiceConfig) -> tuple[list[bytes], list[str]]:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        try:
            form = await request.form(max_files=config.max_images + 1, max_fields=config.max_images + 16)
        except StarletteHTTPException as exc:
            if "Too many files" in str(exc.detail):
                raise RequestRejected(413, f"more than {config.max_images} images in one request; split the request") from None
            raise RequestRejected(400, f"malformed multipart/form-data body: {exc.detail}") from None
        images, names = [], []
        async with contextlib.AsyncExitStack() as stack:
            stack.push_async_callback(form.close)
            for field, value in form.multi_items():
                if not isinstance(value, UploadFile):
                    # never a path or a URL to fetch: the bytes must come in the request
                    raise RequestRejected(
                        422, f"form field {field[:40]!r} is not a file; send each image as a file part "
                             "(curl -F image=@photo.jpg)")
                images.append(await value.read())
                names.append(_client_name(value.filename, len(names)))
        return images, names
    if ctype.startswith(_RAW_TYPES):
        body = await request.body()
        if not body:
            raise RequestRejected(400, "the request body is empty; send the image bytes (curl --data-binary @photo.jpg)")
        return [body], ["body"]
    got = f"Content-Type {ctype!r}" if ctype else "no Content-Type"
    raise RequestRejected(
        415, f"{got}: send one image as the body with Content-Type image/* or {_BINARY}, "
             "or images as multipart/form-data files")


# ---------------------------------------------------------------------------- the factory


def create_app(
    model: Any,
    *,
    classifier: Any = None,
    index: Any = None,
    config: ServiceConfig | None = None,
) -> FastAPI:
    """Build the featurebank embedding service as an ASGI application.

    Parameters
    ----------
    model : path of a featurebank ONNX model, or an open ``ModelRunner``
    classifier : classifier file (``save_classifier``), a ``SavedClassifier``, or None
        (``/v1/classify`` answers 404)
    index : similarity index directory, a ``SimilarityIndex``, or None (``/v1/search`` and
        thumbnails answer 404)
    config : :class:`ServiceConfig` (limits, batching, API key)

    The model, classifier and index are loaded here, so mistakes (wrong file, classifier of
    another model) fail before the server listens. The model is warmed up in the
    background once the server starts; ``/readyz`` answers 200 after that.
    """
    config = config or ServiceConfig()
    engine = ServiceEngine(model, classifier=classifier, index=index, config=config)
    drain = _Drain()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
        import asyncio

        warm = asyncio.create_task(engine.warm_up(), name="featurebank-warmup")
        # a model that cannot run keeps /readyz at 503; say why in the log
        warm.add_done_callback(lambda t: t.cancelled() or t.exception() is None
                               or log.error("warm-up failed, the service stays not ready: %s", t.exception()))
        try:
            yield
        finally:
            # uvicorn has stopped accepting connections and waited for in-flight requests
            if not warm.done():
                warm.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await warm
            await engine.stop()

    key_header = APIKeyHeader(name="X-API-Key", auto_error=False,
                              description="the server's API key (--api-key or FEATUREBANK_API_KEY)")
    bearer = HTTPBearer(auto_error=False, description="the server's API key as a bearer token "
                                                      "(Authorization: Bearer <key>)")

    async def require_key(key: str | None = Security(key_header),
                          token: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
        offered = [k for k in (key, token and token.credentials) if k is not None]
        if not any(hmac.compare_digest(k.encode(), config.api_key.encode()) for k in offered):
            raise RequestRejected(
                401, "wrong API key (header X-API-Key or Authorization: Bearer)" if offered
                else "missing API key: send header X-API-Key: <key> or Authorization: Bearer <key>",
                {"WWW-Authenticate": "ApiKey, Bearer"})

    protected = [Depends(require_key)] if config.api_key else []
    auth_codes = (401,) if config.api_key else ()

    # with an API key, the spec and the docs pages need it like every other route (they
    # list the routes and the limits); they are added below with the key's dependency
    docs = {} if config.api_key is None else {"openapi_url": None, "docs_url": None, "redoc_url": None}
    app = FastAPI(
        title="featurebank embedding service",
        version=__version__,
        description="Embed, classify and search images with a featurebank ONNX model. "
                    "Images go in as the raw body or as multipart/form-data files.",
        lifespan=lifespan,
        **docs,
    )
    app.state.engine = engine
    app.state.drain = drain
    app.add_middleware(_Limits, engine=engine, drain=drain)

    if config.api_key is not None:
        @app.get("/openapi.json", include_in_schema=False, dependencies=protected)
        async def openapi_spec() -> JSONResponse:
            return JSONResponse(app.openapi())

        @app.get("/docs", include_in_schema=False, dependencies=protected)
        async def swagger_page() -> Response:
            return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - Swagger UI")

        @app.get("/redoc", include_in_schema=False, dependencies=protected)
        async def redoc_page() -> Response:
            return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc")

    @app.exception_handler(RequestRejected)
    async def _rejected(request: Request, exc: RequestRejected) -> JSONResponse:
        return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(_BodyTooLarge)
    async def _too_big(request: Request, exc: _BodyTooLarge) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=413, headers={"Connection": "close"})

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # one sentence, like every other error of this service
        parts = [f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg', 'invalid')}"
                 for e in exc.errors()]
        return JSONResponse({"detail": "; ".join(parts)}, status_code=422)

    # -- page and health ------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/healthz", response_model=Health, tags=["health"], summary="the process answers")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz", response_model=Health, tags=["health"], responses=_problems(503),
             summary="the model is loaded and warmed up")
    async def readyz() -> Any:
        if engine.ready and not engine.stopping and not drain.draining:
            return {"status": "ready"}
        state = "stopping" if engine.stopping or drain.draining else "warming up"
        return JSONResponse({"detail": f"not ready: {state}"}, status_code=503, headers={"Retry-After": "1"})

    @app.get("/metrics", tags=["health"], dependencies=protected, responses=_problems(*auth_codes),
             response_class=Response, summary="Prometheus metrics")
    async def metrics() -> Response:
        return Response(engine.metrics.render(), media_type=METRICS_CONTENT_TYPE)

    @app.get("/v1/info", tags=["service"], dependencies=protected, responses=_problems(*auth_codes),
             summary="model, output, decode mode, classifier classes, index size and limits")
    async def info() -> dict:
        return engine.info()

    # -- embedding, classification, search ----------------------------------------------

    embed_codes = (400, *auth_codes, 406, 413, 415, 422, 503, 504)

    @app.post(
        "/v1/embed", tags=["images"], dependencies=protected, openapi_extra=_IMAGE_BODY,
        response_model=EmbedResponse, summary="vectors of one or many images",
        responses={**_problems(*embed_codes),
                   200: {"content": {_BINARY: {"schema": {"type": "string", "format": "binary"}}},
                         "description": "JSON, or with Accept: application/octet-stream the raw little-endian float32 "
                                        "matrix (n, dim), row-major; headers X-Shape: n,dim, X-Dtype: float32, "
                                        "X-Keys: comma-separated content keys"}},
    )
    async def embed(request: Request) -> Any:
        binary = _accept_binary(request)
        images, names = await _read_images(request, config)
        result = await engine.embed(images, names)
        if binary:
            data = np.ascontiguousarray(result.vectors, dtype="<f4").tobytes()
            n, dim = result.vectors.shape
            return Response(data, media_type=_BINARY, headers={
                "X-Shape": f"{n},{dim}", "X-Dtype": "float32", "X-Keys": ",".join(result.keys)})
        return {
            "model": engine.runner.card.backbone, "output": engine.output.name, "dim": engine.output.dim,
            "decode_mode": engine.decode_mode, "space": engine.space,
            "embeddings": [{"key": k, "cached": bool(c), "vector": v.tolist()}
                           for k, c, v in zip(result.keys, result.cached, result.vectors)],
        }

    @app.post("/v1/classify", tags=["images"], dependencies=protected, openapi_extra=_IMAGE_BODY,
              response_model=ClassifyResponse, responses=_problems(*embed_codes),
              summary="labels and probabilities of one or many images")
    async def classify(request: Request) -> dict:
        engine._require_classifier()
        images, names = await _read_images(request, config)
        result = await engine.embed(images, names)
        ranked = engine.classify(result.vectors)
        return {"predictions": [
            {"key": key, "label": pairs[0][0], "probabilities": [{"label": l, "probability": p} for l, p in pairs]}
            for key, pairs in zip(result.keys, ranked)]}

    @app.get("/v1/classify", tags=["images"], dependencies=protected, response_model=ClassifyResponse,
             responses=_problems(*auth_codes, 404, 422), summary="labels and probabilities of an indexed image")
    async def classify_by_id(id: str = Query(..., min_length=1, max_length=256, description="an indexed id")) -> dict:
        engine._require_classifier()
        ranked = engine.classify(await engine.vectors_of_id(id))[0]
        return {"predictions": [{"key": id, "label": ranked[0][0],
                                 "probabilities": [{"label": l, "probability": p} for l, p in ranked]}]}

    def _with_urls(rows: list[dict]) -> list[dict]:
        return [{**r, "thumbnail_url": f"/v1/images/{r['id']}/thumbnail" if r["id"] in engine.paths else None}
                for r in rows]

    @app.post("/v1/search", tags=["images"], dependencies=protected, openapi_extra=_IMAGE_BODY,
              response_model=SearchResponse, responses=_problems(*embed_codes),
              summary="nearest indexed images of one or many images")
    async def search(request: Request, k: int = Query(config.top_k, ge=1, le=config.max_k,
                                                      description="neighbours per image")) -> dict:
        engine._require_index()
        images, names = await _read_images(request, config)
        result = await engine.embed(images, names)
        rows = engine.search(result.vectors, k)
        return {"metric": engine.index.metric,
                "results": [{"key": key, "neighbours": _with_urls(r)} for key, r in zip(result.keys, rows)]}

    @app.get("/v1/search", tags=["images"], dependencies=protected, response_model=SearchResponse,
             responses=_problems(*auth_codes, 404, 422), summary="nearest indexed images of an indexed image")
    async def search_by_id(id: str = Query(..., min_length=1, max_length=256, description="an indexed id"),
                           k: int = Query(config.top_k, ge=1, le=config.max_k)) -> dict:
        rows = engine.search_by_id(id, k)
        return {"metric": engine.index.metric, "results": [{"key": id, "neighbours": _with_urls(rows)}]}

    @app.get("/v1/images/{id}/thumbnail", tags=["images"], dependencies=protected, response_class=Response,
             responses={**_problems(*auth_codes, 404), 200: {"content": {"image/jpeg": {}}}},
             summary="JPEG thumbnail of an indexed image (by id; never by path)")
    async def thumbnail(id: str) -> Response:
        data = await engine.thumbnail(id)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    return app
