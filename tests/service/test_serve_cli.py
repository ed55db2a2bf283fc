"""`featurebank serve` as a real process: starts, answers with the API key from the
environment, and exits cleanly on SIGTERM."""

from __future__ import annotations

import hashlib
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from live_server import metric_value, serve_process
from PIL import Image

from featurebank.cli import main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_serve_process_with_env_key_and_sigterm(assets, photo_dir):
    port = _free_port()
    env = {**os.environ, "FEATUREBANK_API_KEY": "from-env"}
    cmd = [sys.executable, "-m", "featurebank", "serve", "--model", str(assets.model), "--classifier", str(assets.classifier),
           "--index", str(assets.index), "--port", str(port), "--threads", "1", "--decode-workers", "1", "--log-level", "info"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{url}/readyz").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "featurebank serve did not become ready"
            time.sleep(0.1)
        data = (photo_dir / "coffee.jpg").read_bytes()
        assert httpx.post(f"{url}/v1/classify", content=data, headers={"Content-Type": "image/jpeg"}).status_code == 401
        r = httpx.post(f"{url}/v1/classify", content=data, headers={"Content-Type": "image/jpeg", "X-API-Key": "from-env"})
        assert r.status_code == 200 and r.json()["predictions"][0]["label"] in ("brick", "grass", "gravel")
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    # a graceful stop on SIGTERM is a clean exit (uvicorn alone would re-raise the signal)
    assert proc.returncode == 0, out
    assert "Waiting for application shutdown." in out and "Application shutdown complete." in out, out
    assert "serving test_efficientnet" in out and "index of 30 images" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["--max-batch", "0"], "max_batch must be a positive integer; got max_batch=0"),
    (["--queue-size", "8"], r"queue_size \(8\) must be at least max_images \(64\)"),
    (["--max-request-pixels", "1000"], r"max_request_pixels \(1,000\) must be at least max_pixels \(89,478,485\)"),
    (["--graceful-timeout-s", "-1"], "graceful_timeout_s must be a number >= 0; got graceful_timeout_s=-1"),
])
def test_serve_bad_options_are_one_line_errors(assets, capsys, argv, message):
    assert main(["serve", "--model", str(assets.model), *argv]) == 2
    import re

    assert re.search(message, capsys.readouterr().err)


def test_serve_classifier_from_another_model_is_refused(assets, tmp_path, capsys):
    from featurebank.classifiers import load_classifier, save_classifier

    other = save_classifier(load_classifier(assets.classifier).estimator, tmp_path / "o.fbclf", fingerprint="e" * 64)
    assert main(["serve", "--model", str(assets.model), "--classifier", str(other)]) == 2
    assert "the classifier was built on vectors of space eeee" in capsys.readouterr().err


def _png(photos, side: int = 2048) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(photos["astronaut"]).resize((side, side), Image.Resampling.BILINEAR).save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def _wait_metric(url: str, name: str, at_least: float, timeout: float = 10.0, **labels: str) -> None:
    deadline = time.monotonic() + timeout
    while metric_value(httpx.get(f"{url}/metrics", timeout=5).text, name, **labels) < at_least:
        assert time.monotonic() < deadline, f"{name}{labels} did not reach {at_least}"
        time.sleep(0.02)


@pytest.mark.slow
def test_sigterm_finishes_admitted_requests_and_answers_the_rest_503(assets, photos, tmp_path):
    """A request admitted before SIGTERM gets its answer; one still running at the deadline
    (--timeout-s) gets 503 + Retry-After; new connections are refused; a client that went away
    mid-body is not an error; the process exits 0."""
    png = _png(photos)
    args = ["--model", str(assets.model), "--threads", "1", "--decode-workers", "1", "--timeout-s", "3",
            "--body-timeout-s", "60", "--log-level", "info"]
    with serve_process(args, tmp_path / "serve.log") as served, ThreadPoolExecutor(1) as pool:
        # C: goes away in the middle of its body
        with socket.create_connection(("127.0.0.1", served.port)) as c_sock:
            c_sock.sendall(_raw_headers(len(png)) + png[:1000])
            _wait_metric(served.url, "featurebank_requests_in_flight", 2)  # C and this /metrics request
        _wait_metric(served.url, "featurebank_requests_total", 1, route="/v1/embed", status="499")

        # A: sends half its body, and the rest only after SIGTERM; admitted before it
        go_on = threading.Event()

        def body():
            yield png[: len(png) // 2]
            assert go_on.wait(30)
            yield png[len(png) // 2:]

        a = pool.submit(httpx.post, f"{served.url}/v1/embed", content=body(), headers={"Content-Type": "image/png"},
                        timeout=30)
        # B: sends half its body and then nothing: still running at the deadline
        b_sock = socket.create_connection(("127.0.0.1", served.port), timeout=10)
        b_sock.sendall(_raw_headers(len(png)) + png[: len(png) // 2])
        _wait_metric(served.url, "featurebank_requests_in_flight", 3)  # A, B and this request

        served.proc.send_signal(signal.SIGTERM)
        t0 = time.monotonic()
        deadline = t0 + 2
        while True:  # the listening socket goes away
            try:
                socket.create_connection(("127.0.0.1", served.port), timeout=1).close()
            except ConnectionRefusedError:
                break
            assert time.monotonic() < deadline, "still accepting connections 2 s after SIGTERM"
            time.sleep(0.05)
        go_on.set()
        answer_a = a.result(timeout=30)
        with b_sock:
            answer_b = b""
            while chunk := b_sock.recv(65536):
                answer_b += chunk
        b_after = time.monotonic() - t0
        assert served.proc.wait(timeout=20) == 0
        log = served.stderr()
    assert answer_a.status_code == 200, answer_a.text
    (emb,) = answer_a.json()["embeddings"]
    assert emb["key"] == hashlib.sha256(png).hexdigest() and len(emb["vector"]) == answer_a.json()["dim"]
    head, _, detail = answer_b.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ") and b"\r\nretry-after: 1\r\n" in head.lower(), head
    assert json.loads(detail)["detail"].startswith("the service is shutting down; retry the request")
    assert 2.5 <= b_after < 6.0, b_after
    assert "still running when the shutdown grace period ended; answered 503" in log
    assert "the client disconnected before sending the whole request" in log
    assert "ERROR" not in log and "Traceback" not in log, log


def _raw_headers(n: int) -> bytes:
    return (f"POST /v1/embed HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
            f"Content-Length: {n}\r\n\r\n").encode()
