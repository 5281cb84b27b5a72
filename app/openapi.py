"""The OpenAPI document as clients read it: operation ids named after their handlers, file fields marked
``format: binary`` beside OpenAPI 3.1's ``contentMediaType``, and this server's own limits.

FastAPI describes an ``UploadFile`` field with ``contentMediaType`` alone, which openapi-python-client,
Swagger UI and several other generators do not take for a file (they generate a text field); with
``format: binary`` too, every one of them sends the field as a file.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute


def operation_id(route: APIRoute) -> str:
    """A route's operationId: its handler's name (``upload_dataset``, ``start_training``), which generated
    clients take as their method names, instead of FastAPI's name-path-method (``upload_dataset_datasets_post``)."""
    return route.name


def install(app: FastAPI, batch_images: int) -> None:
    """Serve ``app``'s document (built once, on its first request) with file fields marked binary and POST
    /detect/batch's ``files`` limited to ``batch_images`` (``maxItems``: a setting, which the route's static
    declaration cannot know)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(
                title=app.title,
                version=app.version,
                openapi_version=app.openapi_version,
                description=app.description,
                routes=app.routes,
            )
            schemas = document["components"]["schemas"]
            for schema in schemas.values():
                _mark_binary_files(schema)
            batch = document["paths"]["/detect/batch"]["post"]["requestBody"]["content"]["multipart/form-data"]
            schemas[batch["schema"]["$ref"].rsplit("/", 1)[-1]]["properties"]["files"]["maxItems"] = batch_images
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def _mark_binary_files(schema: Any) -> None:
    if isinstance(schema, dict):
        if schema.get("type") == "string" and schema.get("contentMediaType") == "application/octet-stream":
            schema.setdefault("format", "binary")
        for value in schema.values():
            _mark_binary_files(value)
    elif isinstance(schema, list):
        for item in schema:
            _mark_binary_files(item)
