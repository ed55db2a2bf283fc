"""`featurebank serve` as a real process: starts, answers with the API key from the
environment, and exits cleanly on SIGTERM."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest

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
    # uvicorn re-raises the captured SIGTERM after its graceful shutdown, as a process should
    assert proc.returncode in (0, -signal.SIGTERM), out
    assert "Waiting for application shutdown." in out and "Application shutdown complete." in out, out
    assert "serving test_efficientnet" in out and "index of 30 images" in out


@pytest.mark.parametrize(("argv", "message"), [
    (["--max-batch", "0"], "max_batch must be a positive integer; got max_batch=0"),
    (["--queue-size", "8"], r"queue_size \(8\) must be at least max_images \(64\)"),
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
