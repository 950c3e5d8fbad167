"""The OpenAPI document as the service really answers: FastAPI's, plus the API-key schemes, and
every error as it is sent (`{"detail": "..."}`, or `{"error": "..."}` on /v2), not FastAPI's
default list-of-problems 422 body, which this service never sends."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from .auth import add_security_to_openapi
from .middleware import UNLIMITED_PATHS

ERROR = {"type": "object", "required": ["detail"], "properties": {"detail": {"type": "string"}}}
V2_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}
BODY_ERRORS = {"400": "the body could not be parsed", "413": "body, image count or image size over the limits",
               "415": "a Content-Type this endpoint does not take", "422": "the content is not valid"}
OVERLOADED = "no model loaded, shutting down, or overloaded (then with Retry-After)"
UNDOCUMENTED = ("/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json")
# answered as a PNG (Accept: image/png, one image) or raw float32 (Accept: application/octet-stream)
BINARY_ANSWERS = {"/reconstruct", "/decode", "/sample", "/interpolate", "/anomaly-score"}
BINARY = {"schema": {"type": "string", "format": "binary"}}


def service_openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        schema = add_security_to_openapi(schema, app.state.settings.public_metrics)
        app.openapi_schema = document_binary_answers(document_errors(schema))
    return app.openapi_schema


def document_errors(schema: dict[str, Any]) -> dict[str, Any]:
    components = schema.setdefault("components", {}).setdefault("schemas", {})
    components["Error"], components["V2Error"] = ERROR, V2_ERROR
    for name in ("HTTPValidationError", "ValidationError"):
        components.pop(name, None)
    for path, operations in schema.get("paths", {}).items():
        if path in UNDOCUMENTED:
            continue
        error_ref = {"$ref": "#/components/schemas/V2Error" if path.startswith("/v2") else "#/components/schemas/Error"}
        for operation in operations.values():
            responses = operation.setdefault("responses", {})
            codes = dict(BODY_ERRORS) if "requestBody" in operation or operation.get("parameters") else {}
            if path not in UNLIMITED_PATHS or path == "/readyz":
                codes["503"] = OVERLOADED
            for code, description in codes.items():
                responses.setdefault(code, {"description": description})
            for code, response in responses.items():
                if code.startswith(("4", "5")):
                    response["content"] = {"application/json": {"schema": error_ref}}
    return schema


def document_binary_answers(schema: dict[str, Any]) -> dict[str, Any]:
    for path in BINARY_ANSWERS & set(schema.get("paths", {})):
        content = schema["paths"][path]["post"]["responses"]["200"].setdefault("content", {})
        content["image/png"], content["application/octet-stream"] = BINARY, BINARY
    return schema
