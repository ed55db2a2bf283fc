"""Service fixtures: a tiny exported model, a real store, classifier and index built from real
texture photos, and a real uvicorn server on 127.0.0.1 (random free port) in a thread."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")


@dataclass
class Assets:
    model: Path
    classifier: Path
    index: Path
    store: Path
    space: str
    labels: dict  # image path -> class name
    keys: dict  # image path -> content key


@pytest.fixture(scope="session")
def service_model(tmp_path_factory) -> Path:
    from featurebank.export.onnx_export import export_backbone

    path = tmp_path_factory.mktemp("service_model") / "tiny.onnx"
    export_backbone("test_efficientnet", path, weights="random", input_format="uint8")
    return path


@pytest.fixture(scope="session")
def assets(service_model, texture_dir, tmp_path_factory) -> Assets:
    """Store of the 30 texture photos, a LinearProbe trained on them and a Flat cosine index."""
    from featurebank.classifiers import LinearProbe, save_classifier
    from featurebank.embedder.pipeline import embed_images, space_of
    from featurebank.embedder.session import open_model
    from featurebank.search import index_store

    root = tmp_path_factory.mktemp("service_assets")
    runner = open_model(service_model, threads=1)
    emb = embed_images(texture_dir, runner, store=root / "store", decode_mode="fast", progress=False)
    assert emb.ok.all()
    space = space_of(runner, runner.card.output().name, "fast")
    probe = LinearProbe(cv=3).fit(emb.X, emb.labels)
    clf = save_classifier(probe, root / "textures.fbclf", fingerprint=space)
    index_store(root / "store", space, root / "index")
    return Assets(service_model, clf, root / "index", root / "store", space,
                  dict(zip(emb.paths, emb.labels)), dict(zip(emb.paths, emb.keys)))


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
def run_server(app, *, graceful_timeout_s: float = 10.0, wait_ready: bool = True):
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


@pytest.fixture(scope="session")
def live(assets):
    """The full service (classifier + index), default limits, no API key."""
    from featurebank.service import ServiceConfig, create_app

    app = create_app(assets.model, classifier=assets.classifier, index=assets.index,
                     config=ServiceConfig(threads=1, decode_workers=2))
    with run_server(app) as server:
        yield server


def metric_value(text: str, name: str, **labels: str) -> float:
    """Value of one sample in Prometheus text (0.0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    target = f"{name}{{{want}}}" if want else name
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        if sample == target:
            return float(value)
    return 0.0
