"""Running the service with uvicorn: :func:`serve` (what ``featurebank serve`` calls)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from typing import Any

from featurebank.service.config import ServiceConfig

__all__ = ["serve", "make_server"]

log = logging.getLogger("featurebank.service")


_HEADERS_TOO_SLOW = b'{"detail":"the request headers were not received in time (server --header-timeout-s)"}'
_408_RESPONSE = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
                 b"content-length: " + str(len(_HEADERS_TOO_SLOW)).encode() + b"\r\n\r\n" + _HEADERS_TOO_SLOW)


def _protocol_class(header_timeout_s: float):
    """uvicorn's h11 protocol with a deadline on the request line and headers.

    h11 itself waits forever for them; uvicorn only bounds the idle time between requests
    (``timeout_keep_alive``). The deadline runs from the connection's start, and from the
    first byte of each later request on a kept-alive connection (it also covers a body the
    application did not read after answering early). When it passes, a client that has
    sent part of a request gets 408, and the connection is closed.
    """
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _partial = False

        def _between_requests(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _arm(self) -> None:
            self._header_timer = self.loop.call_later(header_timeout_s, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def connection_made(self, transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def data_received(self, data: bytes) -> None:
            if self._between_requests():
                self._partial = True
                if self._header_timer is None:
                    self._arm()
            super().data_received(data)

        def handle_events(self) -> None:
            super().handle_events()
            if not self._between_requests():  # the headers are in: the body has its own deadline
                self._disarm()
                self._partial = False

        def on_response_complete(self) -> None:
            super().on_response_complete()  # may start a pipelined request
            if self._between_requests():
                self._partial = False  # idle now: uvicorn's keep-alive timeout applies

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or not self._between_requests():
                return
            if self._partial:
                log.info("%s: request headers not received within %g s; answered 408 and closed",
                         "%s:%d" % self.client if self.client else "client", header_timeout_s)
                self.transport.write(_408_RESPONSE)
            self.transport.close()

    return HeaderTimeoutProtocol


def make_server(app: Any, *, host: str = "127.0.0.1", port: int = 8000, graceful_timeout_s: float | None = None,
                log_level: str = "info"):
    """A ``uvicorn.Server`` for ``app`` (from :func:`create_app`): call ``.run()`` (blocks), or
    ``.run(sockets=[sock])``.

    The app's :class:`ServiceConfig` bounds slow clients: ``header_timeout_s`` for the
    request line and headers, ``body_timeout_s`` for the body (both 408, then closed), and
    ``max_connections`` open connections (a request beyond gets 503).

    On SIGINT/SIGTERM (or ``server.should_exit = True``) it stops accepting connections; the
    requests in flight get ``graceful_timeout_s`` seconds (default: ``config.timeout_s``) to
    finish, and those still running then get 503 with ``Retry-After``. Then the app's
    shutdown runs what is still queued, and ``run`` returns (a process stopped this way by
    SIGTERM exits 0).
    """
    import uvicorn

    config: ServiceConfig = app.state.engine.config
    grace = config.timeout_s if graceful_timeout_s is None else graceful_timeout_s
    if isinstance(grace, bool) or not isinstance(grace, (int, float)) or grace < 0:
        raise ValueError(f"graceful_timeout_s must be a number >= 0; got graceful_timeout_s={graceful_timeout_s!r}")
    drain = app.state.drain

    class Server(uvicorn.Server):
        async def shutdown(self, sockets=None) -> None:
            drain.begin(grace)
            await super().shutdown(sockets)

        async def serve(self, sockets=None) -> None:
            with self.capture_signals():
                await self._serve(sockets)
                # uvicorn re-raises a captured signal once it has shut down, which kills the
                # process with it; after a graceful stop on SIGTERM the exit is a clean one
                self._captured_signals = [s for s in self._captured_signals if s != signal.SIGTERM]

    uv_config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, http=_protocol_class(config.header_timeout_s),
        # the middleware answers 503 at the grace deadline; uvicorn cancels what is left a little later
        timeout_graceful_shutdown=grace + 5.0,
        # uvicorn counts the connection of the request being admitted among the open ones
        limit_concurrency=config.max_connections + 1, lifespan="on",
        access_log=log_level == "debug", server_header=False, proxy_headers=False)
    return Server(uv_config)


def serve(
    model: str | os.PathLike[str],
    *,
    classifier: str | os.PathLike[str] | None = None,
    index: str | os.PathLike[str] | None = None,
    config: ServiceConfig | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    graceful_timeout_s: float | None = None,
    log_level: str = "info",
    store: str | os.PathLike[str] | None = None,
) -> None:
    """Serve ``model`` (and optionally a classifier and an index) over HTTP until interrupted.

    See :func:`featurebank.service.create_app` for the routes. Binds to ``127.0.0.1`` by
    default; pass ``host="0.0.0.0"`` (and set ``config.api_key``) to accept other machines.
    ``graceful_timeout_s``: see :func:`make_server`.
    """
    from featurebank.service.app import create_app

    if not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"port must be an integer in 0..65535; got port={port!r}")
    app = create_app(model, classifier=classifier, index=index, config=config, store=store)
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
