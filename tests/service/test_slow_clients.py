"""Slow clients against a real uvicorn server, spoken to over raw sockets on 127.0.0.1: headers
and bodies have deadlines (408, then the connection is closed), and the number of connections
served at once is capped (503 beyond), so slow clients cannot pin the server."""

from __future__ import annotations

import json
import select
import socket
import time

import httpx
import pytest
from live_server import run_server

from featurebank.service import ServiceConfig, create_app



def _app(assets, **config):
    return create_app(assets.model, config=ServiceConfig(threads=1, decode_workers=1, **config))


def _connect(live) -> socket.socket:
    host, port = live.url.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=5)


def _headers(n: int) -> bytes:
    return (f"POST /v1/embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/jpeg\r\n"
            f"Content-Length: {n}\r\n\r\n").encode()


def _dribble(sock: socket.socket, data: bytes, *, bytes_per_s: float, step: int, limit_s: float) -> tuple[bytes, float]:
    """Send ``data`` at ``bytes_per_s`` until the server answers or closes (or ``limit_s``
    passes); returns (all bytes the server sent, seconds until its first byte or close)."""
    t0 = time.monotonic()
    sent = 0
    while time.monotonic() - t0 < limit_s:
        if sent < len(data):
            try:
                sock.sendall(data[sent:sent + step])
            except OSError:  # the server closed first
                break
            sent += step
        readable, _, _ = select.select([sock], [], [], step / bytes_per_s)
        if readable:
            break
    elapsed = time.monotonic() - t0
    return _read_until_closed(sock, limit_s=5), elapsed


def _read_until_closed(sock: socket.socket, *, limit_s: float) -> bytes:
    out = b""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        readable, _, _ = select.select([sock], [], [], max(0.0, deadline - time.monotonic()))
        if not readable:
            raise AssertionError(f"the server neither answered nor closed within {limit_s} s; got {out!r}")
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return out
        if not chunk:
            return out
        out += chunk
    raise AssertionError(f"the connection was not closed within {limit_s} s; got {out!r}")


def _status_and_detail(answer: bytes) -> tuple[int, dict, str]:
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body)["detail"] if body else ""


def test_body_sent_at_2_bytes_a_second_gets_408_and_is_closed(assets, photo_dir):
    data = (photo_dir / "coffee.jpg").read_bytes()
    with run_server(_app(assets, header_timeout_s=1.0, body_timeout_s=1.5)) as live, _connect(live) as sock:
        sock.sendall(_headers(len(data)))
        answer, elapsed = _dribble(sock, data, bytes_per_s=2, step=2, limit_s=10)
    status, headers, detail = _status_and_detail(answer)
    assert status == 408 and headers["connection"] == "close"
    assert detail == ("the request body was not received within 1.5 s (server --body-timeout-s); send it faster, "
                      "or send fewer or smaller images per request")
    assert 1.4 <= elapsed < 3.5, elapsed


def test_headers_sent_slowly_get_408_and_a_silent_connection_is_closed(assets):
    with run_server(_app(assets, header_timeout_s=1.0, body_timeout_s=5.0)) as live:
        with _connect(live) as sock:
            sock.sendall(b"POST /v1/embed HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            answer, elapsed = _dribble(sock, b"X-Slow: " + b"a" * 100, bytes_per_s=4, step=1, limit_s=10)
        status, headers, detail = _status_and_detail(answer)
        assert status == 408 and headers["connection"] == "close"
        assert detail == "the request headers were not received in time (server --header-timeout-s)"
        assert 0.9 <= elapsed < 3.0, elapsed

        with _connect(live) as sock:  # says nothing at all: closed without a word
            t0 = time.monotonic()
            assert _read_until_closed(sock, limit_s=5) == b""
            assert 0.9 <= time.monotonic() - t0 < 3.0

        with _connect(live) as sock:  # a kept-alive connection: the next request has the same deadline
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            first = b""
            while not first.endswith(b'{"status":"ok"}'):
                readable, _, _ = select.select([sock], [], [], 5)
                assert readable, first
                first += sock.recv(65536)
            assert first.startswith(b"HTTP/1.1 200 ")
            sock.sendall(b"GET /healthz HTTP/1.1\r\n")
            answer, elapsed = _dribble(sock, b"X-Slow: " + b"a" * 100, bytes_per_s=4, step=1, limit_s=10)
        assert _status_and_detail(answer)[0] == 408 and 0.9 <= elapsed < 3.0, (answer, elapsed)


def test_connections_beyond_the_cap_get_503_and_service_resumes(assets, photo_dir):
    data = (photo_dir / "coffee.jpg").read_bytes()
    with run_server(_app(assets, max_connections=3, header_timeout_s=2.0, body_timeout_s=2.0)) as live:
        slow = [_connect(live) for _ in range(3)]
        try:
            for sock in slow:
                sock.sendall(_headers(len(data)) + data[:10])
            deadline = time.monotonic() + 5
            while live.engine.metrics.sample("featurebank_requests_in_flight") < 3:
                assert time.monotonic() < deadline, "the slow requests did not arrive"
                time.sleep(0.01)
            t0 = time.monotonic()
            with httpx.Client(base_url=live.url, timeout=10) as c:
                refused = c.post("/v1/embed", content=data, headers={"Content-Type": "image/jpeg"})
            answers = [_read_until_closed(sock, limit_s=5) for sock in slow]
            freed = time.monotonic() - t0
            with httpx.Client(base_url=live.url, timeout=10) as c:
                served = c.post("/v1/embed", content=data, headers={"Content-Type": "image/jpeg"})
        finally:
            for sock in slow:
                sock.close()
    assert refused.status_code == 503 and refused.headers["connection"] == "close"
    assert [_status_and_detail(a)[0] for a in answers] == [408, 408, 408]
    assert freed < 3.5, freed
    assert served.status_code == 200 and len(served.json()["embeddings"]) == 1
