"""The service's routes: read the request, call one public method of the engine, shape the
answer (:mod:`featurebank.service.schemas`).

Images come as the raw request body (``Content-Type: image/jpeg``, ``image/png``, ... or
``application/octet-stream``) or as files of a ``multipart/form-data`` body (any field
name; several files give several images, in order). The service never opens a path a client
names: form fields that are not files are refused.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import APIRouter, Query, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from featurebank.service.auth import key_guard
from featurebank.service.config import ServiceConfig
from featurebank.service.engine import RequestRejected, ServiceEngine
from featurebank.service.limits import Drain
from featurebank.service.schemas import (
    BINARY,
    IMAGE_BODY,
    ClassifyResponse,
    EmbedResponse,
    Health,
    SearchResponse,
    problems,
)

__all__ = ["service_router", "docs_router", "STATIC_DIR"]

STATIC_DIR = Path(__file__).with_name("static")
_RAW_TYPES = ("image/", BINARY)


# ---------------------------------------------------------------------------- the routes


def service_router(engine: ServiceEngine, drain: Drain) -> APIRouter:
    """Every route of the service but the static files, over ``engine``.

    Built per app because the limits of ``engine.config`` (``top_k``, ``max_k``, the API
    key) are part of the routes' OpenAPI description.
    """
    config = engine.config
    guard = key_guard(config.api_key)
    auth_codes = (401,) if guard else ()
    embed_codes = (400, *auth_codes, 406, 413, 415, 422, 503, 504)
    router = APIRouter()

    # -- page and health ------------------------------------------------------------------

    @router.get("/", include_in_schema=False)
    async def page() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

    @router.get("/healthz", response_model=Health, tags=["health"], summary="the process answers")
    async def healthz() -> dict:
        return {"status": "ok"}

    @router.get("/readyz", response_model=Health, tags=["health"], responses=problems(503),
                summary="the model is loaded and warmed up")
    async def readyz() -> Any:
        if engine.ready and not engine.stopping and not drain.draining:
            return {"status": "ready"}
        state = "stopping" if engine.stopping or drain.draining else "warming up"
        return JSONResponse({"detail": f"not ready: {state}"}, status_code=503, headers={"Retry-After": "1"})

    @router.get("/metrics", tags=["health"], dependencies=guard, responses=problems(*auth_codes),
                response_class=Response, summary="Prometheus metrics (text format 0.0.4, or OpenMetrics on request)")
    async def metrics(request: Request) -> Response:
        body, content_type = engine.metrics.exposition(request.headers.get("accept"))
        return Response(body, media_type=content_type)

    @router.get("/v1/info", tags=["service"], dependencies=guard, responses=problems(*auth_codes),
                summary="model, output, decode mode, classifier classes, index size and limits")
    async def info() -> dict:
        return engine.info()

    # -- embedding, classification, search ----------------------------------------------

    @router.post(
        "/v1/embed", tags=["images"], dependencies=guard, openapi_extra=IMAGE_BODY,
        response_model=EmbedResponse, summary="vectors of one or many images",
        responses={**problems(*embed_codes),
                   200: {"content": {BINARY: {"schema": {"type": "string", "format": "binary"}}},
                         "description": "JSON, or with Accept: application/octet-stream the raw little-endian float32 "
                                        "matrix (n, dim), row-major; headers X-Shape: n,dim, X-Dtype: float32, "
                                        "X-Keys: comma-separated content keys"}},
    )
    async def embed(request: Request) -> Any:
        binary = accept_binary(request)
        images, names = await read_images(request, config)
        result = await engine.embed(images, names)
        if binary:
            data = np.ascontiguousarray(result.vectors, dtype="<f4").tobytes()
            n, dim = result.vectors.shape
            return Response(data, media_type=BINARY, headers={
                "X-Shape": f"{n},{dim}", "X-Dtype": "float32", "X-Keys": ",".join(result.keys)})
        return {
            "model": engine.runner.card.backbone, "output": engine.output.name, "dim": engine.output.dim,
            "decode_mode": engine.decode_mode, "space": engine.space,
            "embeddings": [{"key": k, "cached": bool(c), "vector": v.tolist()}
                           for k, c, v in zip(result.keys, result.cached, result.vectors)],
        }

    @router.post("/v1/classify", tags=["images"], dependencies=guard, openapi_extra=IMAGE_BODY,
                 response_model=ClassifyResponse, responses=problems(*embed_codes),
                 summary="labels and probabilities of one or many images")
    async def classify(request: Request) -> dict:
        engine.require_classifier()  # 404 before the body is read
        images, names = await read_images(request, config)
        result = await engine.embed(images, names)
        return {"predictions": [_prediction(key, pairs)
                                for key, pairs in zip(result.keys, engine.classify(result.vectors))]}

    @router.get("/v1/classify", tags=["images"], dependencies=guard, response_model=ClassifyResponse,
                responses=problems(*auth_codes, 404, 422), summary="labels and probabilities of an indexed image")
    async def classify_by_id(id: str = Query(..., min_length=1, max_length=256, description="an indexed id")) -> dict:
        engine.require_classifier()
        (pairs,) = engine.classify(await engine.vectors_of_id(id))
        return {"predictions": [_prediction(id, pairs)]}

    @router.post("/v1/search", tags=["images"], dependencies=guard, openapi_extra=IMAGE_BODY,
                 response_model=SearchResponse, responses=problems(*embed_codes),
                 summary="nearest indexed images of one or many images")
    async def search(request: Request, k: int = Query(config.top_k, ge=1, le=config.max_k,
                                                      description="neighbours per image")) -> dict:
        index = engine.require_index()  # 404 before the body is read
        images, names = await read_images(request, config)
        result = await engine.embed(images, names)
        rows = engine.search(result.vectors, k)
        return {"metric": index.metric,
                "results": [{"key": key, "neighbours": _with_urls(engine, r)} for key, r in zip(result.keys, rows)]}

    @router.get("/v1/search", tags=["images"], dependencies=guard, response_model=SearchResponse,
                responses=problems(*auth_codes, 404, 422), summary="nearest indexed images of an indexed image")
    async def search_by_id(id: str = Query(..., min_length=1, max_length=256, description="an indexed id"),
                           k: int = Query(config.top_k, ge=1, le=config.max_k)) -> dict:
        rows = engine.search_by_id(id, k)
        return {"metric": engine.require_index().metric, "results": [{"key": id, "neighbours": _with_urls(engine, rows)}]}

    @router.get("/v1/images/{id}/thumbnail", tags=["images"], dependencies=guard, response_class=Response,
                responses={**problems(*auth_codes, 404), 200: {"content": {"image/jpeg": {}}}},
                summary="JPEG thumbnail of an indexed image (by id; never by path)")
    async def thumbnail(id: str) -> Response:
        data = await engine.thumbnail(id)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    return router


def docs_router(api_key: str) -> APIRouter:
    """``/openapi.json``, ``/docs`` and ``/redoc`` behind the API key: they list the routes and
    the limits, so with a key set they need it like every other route."""
    guard = key_guard(api_key)
    router = APIRouter(include_in_schema=False, dependencies=guard)

    @router.get("/openapi.json")
    async def openapi_spec(request: Request) -> JSONResponse:
        return JSONResponse(request.app.openapi())

    @router.get("/docs")
    async def swagger_page(request: Request) -> Response:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{request.app.title} - Swagger UI")

    @router.get("/redoc")
    async def redoc_page(request: Request) -> Response:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{request.app.title} - ReDoc")

    return router


def _prediction(key: str, pairs: list[tuple[str, float]]) -> dict:
    return {"key": key, "label": pairs[0][0], "probabilities": [{"label": l, "probability": p} for l, p in pairs]}


def _with_urls(engine: ServiceEngine, rows: list[dict]) -> list[dict]:
    return [{**r, "thumbnail_url": f"/v1/images/{r['id']}/thumbnail" if r["id"] in engine.paths else None}
            for r in rows]


# ---------------------------------------------------------------------------- reading requests


def accept_binary(request: Request) -> bool:
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
    binary_q = best.get(BINARY, wildcard)
    if json_q <= 0 and binary_q <= 0:
        raise RequestRejected(406, f"Accept: {header!r} allows neither application/json nor {BINARY}")
    return binary_q > json_q


def _client_name(name: str | None, i: int) -> str:
    if not name:
        return f"image {i}"
    return f"image {i} ({name[:80]!r})"


async def read_images(request: Request, config: ServiceConfig) -> tuple[list[bytes], list[str]]:
    """(encoded images, how to call each in error messages) of a request's body."""
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
        415, f"{got}: send one image as the body with Content-Type image/* or {BINARY}, "
             "or images as multipart/form-data files")
