"""Running the service with uvicorn: :func:`serve` (what ``featurebank serve`` calls)."""

from __future__ import annotations

import logging
import os
from typing import Any

from featurebank.service.config import ServiceConfig

__all__ = ["serve", "make_server"]

log = logging.getLogger("featurebank.service")


def make_server(app: Any, *, host: str = "127.0.0.1", port: int = 8000, graceful_timeout_s: float = 30.0,
                limit_concurrency: int | None = 512, log_level: str = "info"):
    """A ``uvicorn.Server`` for ``app``: call ``.run()`` (blocks), or ``.run(sockets=[sock])``.

    On SIGINT/SIGTERM (or ``server.should_exit = True``) it stops accepting connections,
    lets in-flight requests finish for up to ``graceful_timeout_s`` seconds, then the app's
    shutdown runs what is still queued. ``limit_concurrency`` caps open connections and
    tasks (503 beyond), which bounds the request bodies held in memory at once.
    """
    import uvicorn

    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=graceful_timeout_s,
                            limit_concurrency=limit_concurrency, lifespan="on", access_log=log_level == "debug",
                            server_header=False, proxy_headers=False)
    return uvicorn.Server(config)


def serve(
    model: str | os.PathLike[str],
    *,
    classifier: str | os.PathLike[str] | None = None,
    index: str | os.PathLike[str] | None = None,
    config: ServiceConfig | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    graceful_timeout_s: float = 30.0,
    log_level: str = "info",
) -> None:
    """Serve ``model`` (and optionally a classifier and an index) over HTTP until interrupted.

    See :func:`featurebank.service.create_app` for the routes. Binds to ``127.0.0.1`` by
    default; pass ``host="0.0.0.0"`` (and set ``config.api_key``) to accept other machines.
    """
    from featurebank.service.app import create_app

    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an integer in 0..65535; got port={port!r}")
    app = create_app(model, classifier=classifier, index=index, config=config)
    engine = app.state.engine
    log.info(
        "serving %s (output %s, dim %d, decode %s)%s%s on http://%s:%d",
        engine.runner.card.backbone, engine.output.name, engine.output.dim, engine.decode_mode,
        f", classifier of {len(engine.classifier.classes)} classes" if engine.classifier else "",
        f", index of {engine.index.count} images" if engine.index else "", host, port,
    )
    if engine.config.api_key is None and host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("listening on %s without an API key: anyone who reaches this port can use the service "
                    "(set --api-key or FEATUREBANK_API_KEY)", host)
    make_server(app, host=host, port=port, graceful_timeout_s=graceful_timeout_s, log_level=log_level).run()
