"""/openapi.json is a valid OpenAPI 3.1 document that matches the router exactly."""

from __future__ import annotations

from openapi_spec_validator import validate

from service.app import create_app
from service.openapi import openapi_document
from service.settings import Settings
from tests.conftest import Gateway


def _routes() -> set[tuple[str, str]]:
    app = create_app(Settings())
    found = set()
    for route in app.router.routes():
        if route.method in ("HEAD", "OPTIONS"):
            continue
        info = route.resource.get_info() if route.resource else {}
        path = info.get("path") or info.get("formatter")
        found.add((route.method.lower(), str(path)))
    return found


def test_every_route_is_documented_and_nothing_else() -> None:
    """Each (method, path) the router serves is in the document, and the document adds none."""
    doc = openapi_document()
    documented = {(method, path) for path, ops in doc["paths"].items() for method in ops}
    assert documented == _routes()


def test_the_document_is_valid_openapi_3_1() -> None:
    """The document passes the OpenAPI 3.1 validator."""
    doc = openapi_document()
    assert doc["openapi"].startswith("3.1")
    validate(doc)


async def test_the_gateway_serves_it(gateway: Gateway) -> None:
    """GET /openapi.json returns the same document."""
    status, body = await gateway.call("GET", "/openapi.json")
    assert status == 200 and body == openapi_document()


def test_error_answers_document_their_status_and_headers() -> None:
    """Every operation lists 405 (with Allow) and 500; 429 and 503 carry Retry-After; a
    submit's answers carry Location."""
    doc = openapi_document()
    for path, operations in doc["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert {"405", "500"} <= set(responses), (method, path)
            assert "Allow" in responses["405"]["headers"]
            for status in ("429", "503"):
                schema = responses.get(status, {}).get("content", {}).get("application/json")
                if schema and schema["schema"] == {"$ref": "#/components/schemas/Error"}:
                    assert "Retry-After" in responses[status]["headers"], (method, path)
    submit = doc["paths"]["/v1/jobs"]["post"]["responses"]
    assert "Location" in submit["202"]["headers"] and "Location" in submit["200"]["headers"]
