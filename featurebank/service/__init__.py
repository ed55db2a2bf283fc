"""featurebank.service: the HTTP embedding service (FastAPI + uvicorn) and its web page.

A thin shell over the embedder, classifiers and search: :func:`create_app` builds the ASGI
app, :func:`serve` runs it with uvicorn (``featurebank serve``). Needs the ``service``
extra (fastapi, uvicorn, python-multipart, prometheus-client).

>>> from featurebank.service import ServiceConfig, create_app   # doctest: +SKIP
>>> app = create_app("model.onnx", index="photos.idx", config=ServiceConfig(max_batch=16))  # doctest: +SKIP
"""

from featurebank.service.app import create_app
from featurebank.service.config import API_KEY_ENV, ServiceConfig
from featurebank.service.engine import EmbedResult, RequestRejected, ServiceEngine
from featurebank.service.server import make_server, serve

__all__ = ["create_app", "serve", "make_server", "ServiceConfig", "ServiceEngine", "EmbedResult", "RequestRejected",
           "API_KEY_ENV"]
