"""The HTTP application: :func:`create_app` wires a ServiceEngine, the limits middleware
(:mod:`~featurebank.service.limits`), the API-key guard (:mod:`~featurebank.service.auth`) and
the routes (:mod:`~featurebank.service.routes`, answering :mod:`~featurebank.service.schemas`).

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
``GET /v1/audit``          suspects of ``featurebank audit`` on the store's labelled images (needs ``store``)
``GET /v1/info``           what is served and the limits
``GET /metrics``           Prometheus text (OpenMetrics where the scraper asks for it)
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
import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles

from featurebank import __version__
from featurebank.service.config import ServiceConfig
from featurebank.service.engine import RequestRejected, ServiceEngine
from featurebank.service.limits import BodyTooLarge, Drain, LimitsMiddleware
from featurebank.service.routes import STATIC_DIR, docs_router, service_router

__all__ = ["create_app"]

log = logging.getLogger("featurebank.service")


def create_app(
    model: Any,
    *,
    classifier: Any = None,
    index: Any = None,
    config: ServiceConfig | None = None,
    store: Any = None,
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
    store : a store directory holding the served model's vectors, or None: ``/v1/audit`` and
        the page's audit list show the suspects of its labelled files (:mod:`~featurebank.service.audit`)

    The model, classifier and index are loaded here, so mistakes (wrong file, classifier of
    another model) fail before the server listens. The model is warmed up in the
    background once the server starts; ``/readyz`` answers 200 after that.
    """
    config = config or ServiceConfig()
    engine = ServiceEngine(model, classifier=classifier, index=index, config=config)
    drain = Drain()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        await engine.start()
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

    # with an API key, the spec and the docs pages need it like every other route (they
    # list the routes and the limits): docs_router serves them behind the key
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
    app.add_middleware(LimitsMiddleware, engine=engine, drain=drain)
    app.add_exception_handler(RequestRejected, _rejected)
    app.add_exception_handler(BodyTooLarge, _body_too_large)
    app.add_exception_handler(RequestValidationError, _invalid)
    if config.api_key is not None:
        app.include_router(docs_router(config.api_key))
    app.include_router(service_router(engine, drain))
    if store is not None:
        from featurebank.service.audit import audit_router, check_store

        check_store(engine, store)
        app.include_router(audit_router(engine, store))
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


async def _rejected(request: Request, exc: RequestRejected) -> JSONResponse:
    return JSONResponse({"detail": exc.detail}, status_code=exc.status, headers=exc.headers)


async def _body_too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
    return JSONResponse({"detail": str(exc)}, status_code=413, headers={"Connection": "close"})


async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
    # one sentence, like every other error of this service
    parts = [f"{'.'.join(str(p) for p in e.get('loc', ())[1:]) or 'request'}: {e.get('msg', 'invalid')}"
             for e in exc.errors()]
    return JSONResponse({"detail": "; ".join(parts)}, status_code=422)
