"""What the service's routes answer (pydantic models) and how the OpenAPI spec describes
image bodies and error answers. No behaviour: the routes (:mod:`featurebank.service.routes`)
fill these in."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

__all__ = ["Problem", "Embedding", "EmbedResponse", "LabelProbability", "Prediction", "ClassifyResponse", "Neighbour",
           "SearchResult", "SearchResponse", "Health", "BINARY", "IMAGE_BODY", "problems"]

BINARY = "application/octet-stream"


class Problem(BaseModel):
    detail: str = Field(description="what is wrong and how to fix it")


class Embedding(BaseModel):
    key: str = Field(description="sha256 hex of the image bytes (the store's content key)")
    cached: bool = Field(description="answered from the embedding cache")
    vector: list[float]


class EmbedResponse(BaseModel):
    model: str
    output: str
    dim: int
    decode_mode: str
    space: str = Field(description="vector-space fingerprint (output + decode mode)")
    embeddings: list[Embedding]


class LabelProbability(BaseModel):
    label: str
    probability: float


class Prediction(BaseModel):
    key: str
    label: str
    probabilities: list[LabelProbability] = Field(description="every class, most probable first")


class ClassifyResponse(BaseModel):
    predictions: list[Prediction]


class Neighbour(BaseModel):
    id: str = Field(description="indexed id (content key)")
    score: float = Field(description="cosine similarity (larger is closer) or squared L2 distance (smaller is closer)")
    rank: int
    name: str | None = Field(description="the indexed file, relative to the folder holding every indexed file "
                                         "(null where the store records no file)")
    path: str | None = Field(description="absolute path of the indexed file on the server; null unless the "
                                         "server runs with --expose-paths")
    thumbnail_url: str | None


class SearchResult(BaseModel):
    key: str = Field(description="content key of the query image (or the queried id)")
    neighbours: list[Neighbour]


class SearchResponse(BaseModel):
    metric: str
    results: list[SearchResult]


class Health(BaseModel):
    status: str


#: ``openapi_extra`` of the routes that take images: the body is read by hand (raw or
#: multipart), so FastAPI cannot derive it from a parameter.
IMAGE_BODY: dict[str, Any] = {
    "requestBody": {
        "required": True,
        "description": "one image as the raw body, or several as multipart/form-data files (any field name)",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"image": {"type": "array", "items": {"type": "string", "format": "binary"}}},
                    "required": ["image"],
                }
            },
            **{t: {"schema": {"type": "string", "format": "binary"}}
               for t in ("image/jpeg", "image/png", "image/webp", BINARY)},
        },
    }
}

_PROBLEM_TEXT = {
    400: "no image, or a malformed body",
    401: "missing or wrong API key (header X-API-Key or Authorization: Bearer)",
    404: "not loaded / not in the index",
    406: "the Accept header asks for a format this route cannot give",
    413: "body, image count or image pixels over the limit",
    415: "the body is neither an image nor multipart/form-data",
    422: "an image cannot be decoded, or a parameter is invalid",
    503: "queue full or shutting down; retry after Retry-After seconds",
    504: "not answered within the server's timeout",
}


def problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    """``responses=`` of a route: each error status it may answer, with the :class:`Problem` body."""
    return {c: {"model": Problem, "description": _PROBLEM_TEXT[c]} for c in codes}
