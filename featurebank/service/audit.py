"""``GET /v1/audit``: the suspects of ``featurebank audit`` for the labelled files a store
records, in the served model's vector space, for the web page (``featurebank serve --store DIR``).

Computed once, when the app is built (before the server listens), then kept. Clients see each file's
name relative to the folder holding all audited files, never a server path, unless the
operator opts in (``--expose-paths``); thumbnails are served by content key only.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter
from fastapi.responses import Response

from featurebank.errors import FingerprintMismatchError
from featurebank.service.auth import key_guard
from featurebank.service.engine import RequestRejected, ServiceEngine, _display_names, _printable
from featurebank.service.schemas import problems

__all__ = ["audit_router", "check_store"]


def check_store(engine: ServiceEngine, store: Any) -> None:
    """Refuse a store that holds no vectors of the served model's space (at start, not on the
    first request)."""
    from featurebank.store import open_store

    with open_store(store, create=False) as st:
        spaces = [s.fingerprint for s in st.spaces()]
    if engine.space not in spaces:
        raise FingerprintMismatchError(
            f"the store {str(store)!r} holds no vectors of the served model's space ({engine.space[:12]}…; it holds "
            f"{', '.join(s[:12] + '…' for s in spaces) or 'none'}): embed the labelled images with this model "
            "first (featurebank embed SOURCE --store DIR --model MODEL)")


def audit_router(engine: ServiceEngine, store: Any) -> APIRouter:
    """The audit routes over ``store``. The audit runs here, once, before the server listens
    (28 s for 10,000 images on 2 cores: a first request would otherwise meet the request
    timeout), so a store that cannot be audited fails at start, like a wrong classifier."""
    from featurebank.curation import audit_store

    guard = key_guard(engine.config.api_key)
    codes = (401,) if guard else ()
    router = APIRouter()
    raw = audit_store(store, engine.space)
    rows = raw["suspects"]
    names = _display_names({str(i): r["path"] for i, r in enumerate(rows)})
    by_path = {r["path"]: names[str(i)] for i, r in enumerate(rows)}
    suspects = []
    for i, r in enumerate(rows):
        row = {k: v for k, v in r.items() if k not in ("path", "related")}
        row["name"] = names[str(i)]
        row["related"] = [by_path.get(p, _printable(p.rsplit("/", 1)[-1])) for p in r["related"]]
        row["thumbnail_url"] = f"/v1/audit/{r['key']}/thumbnail"
        if engine.config.expose_paths:
            row["path"] = _printable(r["path"])
        suspects.append(row)
    report = {"summary": raw["summary"], "suspects": suspects}
    paths = {r["key"]: r["path"] for r in rows}

    @router.get("/v1/audit", tags=["audit"], dependencies=guard, responses=problems(*codes),
                summary="label issues, outliers and conflicts of the store's labelled images (featurebank audit)")
    async def audit() -> dict:
        return report

    @router.get("/v1/audit/{key}/thumbnail", tags=["audit"], dependencies=guard, response_class=Response,
                responses={**problems(*codes, 404), 200: {"content": {"image/jpeg": {}}}},
                summary="JPEG thumbnail of an audited image (by content key; never by path)")
    async def thumbnail(key: str) -> Response:
        path = paths.get(key)
        if path is None:
            raise RequestRejected(404, f"id {key[:80]!r} is not among the audit's suspects")
        data = await asyncio.get_running_loop().run_in_executor(engine._decode_pool, engine._make_thumbnail, path)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    return router
