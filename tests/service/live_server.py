"""A real uvicorn server on 127.0.0.1 (random free port) in a thread, ``featurebank serve`` in a
subprocess, and a Prometheus text reader, shared by the service tests (a module of its own: `conftest` is not importable by
name when several test folders have one)."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx


@dataclass
class LiveServer:
    url: str
    server: object
    thread: threading.Thread
    app: object

    @property
    def engine(self):
        return self.app.state.engine

    def client(self, **kw) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, **kw)


@contextlib.contextmanager
def run_server(app, *, graceful_timeout_s: float | None = 10.0, wait_ready: bool = True):
    """Serve ``app`` with a real uvicorn server on 127.0.0.1 in a thread; yields a LiveServer."""
    from featurebank.service import make_server

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = make_server(app, host="127.0.0.1", port=port, graceful_timeout_s=graceful_timeout_s, log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name=f"uvicorn-{port}")
    thread.start()
    live = LiveServer(f"http://127.0.0.1:{port}", server, thread, app)
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    if wait_ready:
        with live.client() as c:
            while c.get("/readyz").status_code != 200:
                if time.monotonic() > deadline:
                    raise RuntimeError("service did not become ready")
                time.sleep(0.02)
    try:
        yield live
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def metric_value(text: str, name: str, **labels: str) -> float:
    """Value of one sample in Prometheus text: 0.0 where the metric is exposed but that sample
    has not been recorded yet; AssertionError where no exposed metric has that sample name
    (a typo must not read as 0). Bucket bounds compare as numbers (``le="1"`` is ``1.0``)."""
    from prometheus_client.parser import text_string_to_metric_families

    def same(got: dict[str, str]) -> bool:
        if set(got) != set(labels):
            return False
        return all(float(got[k]) == float(v) if k == "le" else got[k] == v for k, v in labels.items())

    declared = False
    for family in text_string_to_metric_families(text):
        declared = declared or name.startswith(family.name)
        for sample in family.samples:
            if sample.name == name and same(sample.labels):
                return sample.value
    assert declared, f"no metric exposes samples named {name!r}"
    return 0.0


@dataclass
class ServeProcess:
    """``featurebank serve`` in a subprocess; its stderr goes to ``log`` (a file)."""

    proc: subprocess.Popen
    url: str
    port: int
    log: Path

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def peak_rss_mb(self) -> float:
        """VmHWM (peak resident set) of the server process, in MiB."""
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmHWM in /proc/<pid>/status")


@contextlib.contextmanager
def serve_process(args: list[str], log: Path, *, env: dict | None = None, ready_timeout: float = 90.0):
    """Run ``featurebank serve ARGS --port <free>`` until it is ready; SIGKILL on the way out if
    it is still running (a test that expects it to stop sends SIGTERM itself)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [sys.executable, "-m", "featurebank", "serve", *args, "--port", str(port)]
    with open(log, "wb") as err:
        proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=subprocess.DEVNULL, stderr=err)
    served = ServeProcess(proc, f"http://127.0.0.1:{port}", port, log)
    try:
        deadline = time.monotonic() + ready_timeout
        while True:
            try:
                if httpx.get(f"{served.url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"featurebank serve did not become ready:\n{served.stderr()}")
            time.sleep(0.1)
        yield served
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)
