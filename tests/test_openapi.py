"""The OpenAPI document describes the API as it really behaves (issue 16, defect 7).

The document is checked directly (request bodies a client or Swagger UI can send, every status each
route returns, one error schema, the package's version), and then Schemathesis runs against a live
server on 127.0.0.1 with all its checks: bodies the schema calls valid must be accepted, invalid ones
refused, and every response must be documented and match its schema. Its image bodies are real
JPEG / PNG files (tests/openapi_hooks.py); the run is bounded and seeded.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.rest import create_app
from service.settings import ServiceSettings
from tests.helpers import start_server

ROOT = Path(__file__).resolve().parents[1]
IMAGE_ROUTES = ("/v1/score", "/v1/explain")
ERRORS = {
    # what each route answers besides 200 (read from service/rest.py, service/core.py and service/admission.py)
    "/v1/score": {400, 401, 404, 408, 413, 415, 429, 503, 504},
    "/v1/explain": {400, 401, 404, 408, 413, 415, 429, 503, 504},
    "/v1/score:batch": {400, 401, 404, 408, 413, 415},
    "/v1/models": {401},
    "/healthz": set(),
    "/readyz": {503},
}
SETTINGS = ServiceSettings(host="127.0.0.1", grpc_enabled=False)


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return create_app(SETTINGS).openapi()


def resolve(document: dict[str, Any], schema: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        schema = document["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]]
    return schema


def test_version_is_the_package_version(document: dict[str, Any]) -> None:
    assert document["info"]["version"] == importlib.metadata.version("musiq-service")


def test_image_routes_declare_their_bodies(document: dict[str, Any]) -> None:
    for path in IMAGE_ROUTES:
        body = document["paths"][path]["post"].get("requestBody")
        assert body is not None, f"{path}: no request body declared"
        assert body["required"] is True
        content = body["content"]
        assert set(content) == {"image/*", "application/octet-stream", "multipart/form-data"}, path
        for raw in ("image/*", "application/octet-stream"):
            assert content[raw]["schema"] == {"type": "string", "format": "binary"}
        form = resolve(document, content["multipart/form-data"]["schema"])
        assert form["required"] == ["image"]
        assert form["properties"]["image"] == {"type": "string", "format": "binary"}
        assert content["multipart/form-data"]["encoding"]["image"]["contentType"] == "image/*"


def test_batch_route_declares_json_and_multipart(document: dict[str, Any]) -> None:
    body = document["paths"]["/v1/score:batch"]["post"].get("requestBody")
    assert body is not None, "/v1/score:batch: no request body declared"
    assert body["required"] is True and set(body["content"]) == {"application/json", "multipart/form-data"}
    batch = resolve(document, body["content"]["application/json"]["schema"])
    assert batch["required"] == ["items"]
    items = batch["properties"]["items"]
    assert (items["minItems"], items["maxItems"]) == (1, SETTINGS.max_batch_items)
    item = resolve(document, items["items"])
    assert (
        set(item["required"]) == {"id", "image"}
        and item["properties"]["image"]["contentEncoding"] == "base64"
    )
    files = resolve(document, body["content"]["multipart/form-data"]["schema"])["properties"]["images"]
    assert files["items"] == {"type": "string", "format": "binary"}
    assert (files["minItems"], files["maxItems"]) == (1, SETTINGS.max_batch_items)


def test_every_status_is_declared_with_the_error_schema(document: dict[str, Any]) -> None:
    error = resolve(document, {"$ref": "#/components/schemas/ErrorResponse"})
    assert error["required"] == ["error"]
    assert set(resolve(document, error["properties"]["error"])["required"]) == {"code", "message"}
    for path, statuses in ERRORS.items():
        (operation,) = document["paths"][path].values()
        responses = operation["responses"]
        assert set(responses) == {"200", *map(str, statuses)}, path
        for status in statuses:
            schema = responses[str(status)]["content"]["application/json"]["schema"]
            assert schema == {"$ref": "#/components/schemas/ErrorResponse"}, (path, status)
    for path in IMAGE_ROUTES:
        cap = next(
            p for p in document["paths"][path]["post"]["parameters"] if p["name"] == "max_native_tokens"
        )
        assert cap["schema"]["anyOf"][0]["maximum"] == SETTINGS.max_native_tokens


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    srv, thread, url = start_server(SETTINGS)
    yield url
    srv.should_exit = True
    thread.join(timeout=30)


def test_schemathesis_finds_no_failure_on_the_live_server(server: str, tmp_path: Path) -> None:
    """All checks, every operation in the schema, at most 25 generated cases each, seed fixed."""
    st = Path(sys.executable).with_name("st")
    assert st.exists(), "schemathesis is a dev dependency (pip install -e '.[dev]')"
    cmd = [str(st), "run", f"{server}/openapi.json", "--checks", "all", "--max-examples", "25"]
    cmd += ["--seed", "16", "--workers", "1", "--generation-database", "none"]
    cmd += ["--no-color", "--output-sanitize", "false", "--request-timeout", "60"]
    env = {**os.environ, "SCHEMATHESIS_HOOKS": "tests.openapi_hooks", "PYTHONPATH": str(ROOT)}
    start = time.monotonic()
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120, check=False)
    elapsed = time.monotonic() - start
    print(f"schemathesis: {elapsed:.1f} s\n{run.stdout[-3000:]}")
    assert run.returncode == 0, run.stdout[-20000:] + run.stderr[-5000:]
    assert f"Tested: {len(ERRORS)}" in run.stdout, run.stdout[-3000:]  # every operation ran


def test_api_keys_appear_as_security_schemes(document: dict[str, Any]) -> None:
    """With keys configured, /docs can send one (Authorize) and a generated client knows it must."""
    assert "securitySchemes" not in document["components"]
    keyed = create_app(ServiceSettings(host="127.0.0.1", grpc_enabled=False, api_keys=["k"])).openapi()
    assert keyed["components"]["securitySchemes"] == {
        "ApiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        "Bearer": {"type": "http", "scheme": "bearer"},
    }
    for path, operations in keyed["paths"].items():
        for operation in operations.values():
            assert ("security" in operation) == path.startswith("/v1/"), path
