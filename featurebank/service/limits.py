"""The HTTP layer's limits, applied around every request before any route runs.

:class:`LimitsMiddleware` (pure ASGI) bounds the request body in size (413) and in time
(408), answers 503 while the server drains, and records the request metrics and the
in-flight gauge. :class:`Drain` is the shutdown of the HTTP layer that the server begins on
SIGTERM/SIGINT. The time to send the headers and the number of open connections are bounded
by the server (:mod:`featurebank.service.server`); the pixels of a request by the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from fastapi.responses import JSONResponse
from starlette.requests import ClientDisconnect

from featurebank.service.engine import ServiceEngine

__all__ = ["LimitsMiddleware", "Drain", "BodyTooLarge", "SHUTTING_DOWN"]

log = logging.getLogger("featurebank.service")

# Content-Length above the limit: read and discard up to this much before answering 413, so
# that a client still writing its body reads the answer instead of a reset connection.
_DRAIN_LIMIT = 64 * 1024 * 1024

SHUTTING_DOWN = "the service is shutting down; retry the request (on another instance, or once it is back)"


class BodyTooLarge(Exception):
    """The body streamed past ``max_body_bytes`` while a route read it (answered 413)."""


class _BodyTimeout(Exception):
    pass


class Drain:
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


class LimitsMiddleware:
    """Pure ASGI middleware: body size (413) and body time (408) limits, shutdown (503),
    request metrics, in-flight gauge.

    Pure ASGI (not BaseHTTPMiddleware) so that the body is counted and timed while it streams
    in.
    """

    def __init__(self, app, engine: ServiceEngine, drain: Drain) -> None:
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
        shutdown = asyncio.timeout(None)  # rescheduled by Drain.begin
        self.drain.running.add(shutdown)
        try:
            if self.drain.draining:
                await _send_problem(send_status, 503, SHUTTING_DOWN, {"Retry-After": "1", "Connection": "close"})
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
                            raise BodyTooLarge(_too_large(received, limit, streaming=True))
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
                await _send_problem(send_status, 503, SHUTTING_DOWN, {"Retry-After": "1", "Connection": "close"})
        finally:
            self.drain.running.discard(shutdown)
            metrics.in_flight.dec()
            route = scope.get("route")
            label = getattr(route, "path", None) or "unmatched"
            metrics.requests.labels(route=label, status=str(status["code"])).inc()
            metrics.latency.labels(route=label).observe(time.perf_counter() - started)


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
