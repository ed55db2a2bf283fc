"""Schemathesis over the service's OpenAPI spec against a real server: generated requests
(bounded, derandomised) never get a 5xx other than a deliberate 503, and every response
matches the spec (status codes, content types, schemas, headers)."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from live_server import run_server  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402

from featurebank.service import ServiceConfig, create_app  # noqa: E402

KEY = "schema-key"


@pytest.fixture(scope="module")
def spec_server(assets):
    app = create_app(assets.model, classifier=assets.classifier, index=assets.index,
                     config=ServiceConfig(threads=1, decode_workers=2, api_key=KEY, max_pixels=4_000_000))
    with run_server(app) as live:
        yield live


def no_unplanned_server_error(ctx, response, case):
    # 503 (queue full, shutting down, not ready) is a deliberate answer; any other 5xx is a bug
    if response.status_code >= 500 and response.status_code != 503:
        raise AssertionError(f"{case.method} {case.path} -> {response.status_code}: {response.text[:300]}")


CHECKS = [
    no_unplanned_server_error,
    schemathesis.checks.status_code_conformance,
    schemathesis.checks.content_type_conformance,
    schemathesis.checks.response_schema_conformance,
    schemathesis.checks.response_headers_conformance,
]


def test_generated_requests_get_planned_answers(spec_server):
    # Schemathesis' pytest plugin (`from_fixture`) does not run under this pytest; the same
    # cases are drawn here with Hypothesis directly, one bounded run per operation.
    schema = schemathesis.openapi.from_url(f"{spec_server.url}/openapi.json", headers={"X-API-Key": KEY})
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    seen = {}
    for operation in operations:
        statuses = seen.setdefault(operation.label, set())

        @settings(max_examples=12, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def run(case):
            response = case.call(headers={"X-API-Key": KEY}, timeout=30)
            statuses.add(response.status_code)
            case.validate_response(response, checks=CHECKS)

        run()
    # the generated requests did reach the handlers, not only the validation layer
    assert 200 in seen["GET /healthz"] and 200 in seen["GET /metrics"]
    assert 422 in seen["POST /v1/embed"] or 415 in seen["POST /v1/embed"]


def test_spec_documents_image_bodies_and_auth(spec_server):
    import httpx

    assert httpx.get(f"{spec_server.url}/openapi.json").status_code == 401  # the key guards the spec too
    spec = httpx.get(f"{spec_server.url}/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()
    body = spec["paths"]["/v1/embed"]["post"]["requestBody"]["content"]
    assert {"multipart/form-data", "image/jpeg", "image/png", "application/octet-stream"} <= set(body)
    assert spec["components"]["securitySchemes"]["APIKeyHeader"] == {
        "type": "apiKey", "in": "header", "name": "X-API-Key",
        "description": "the server's API key (--api-key or FEATUREBANK_API_KEY)"}
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"
    assert spec["paths"]["/v1/embed"]["post"]["security"] == [{"APIKeyHeader": []}, {"HTTPBearer": []}]
    assert "security" not in spec["paths"]["/healthz"]["get"]
    assert {"401", "413", "415", "422", "503", "504"} <= set(spec["paths"]["/v1/embed"]["post"]["responses"])
