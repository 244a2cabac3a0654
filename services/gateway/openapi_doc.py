"""The gateway's OpenAPI document: FastAPI's generator, told about request bodies it cannot see.

The routes read their bodies themselves (request_body.py: a byte limit before reading, NaN and lone surrogates
refused, 400 rather than FastAPI's 422), so FastAPI sees no body parameter. Each route names its body model in
`openapi_extra` (json_body) and the models' schemas are added to the document's components here.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from typing import Any, Iterable

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from splitserve.services.gateway.response_schemas import ErrorResponse

_REF = "#/components/schemas/{model}"

_WHY = {400: "invalid request", 401: "missing or wrong API key", 404: "unknown model",
        413: "request body or prompt over the server's limit", 429: "at capacity; retry after Retry-After seconds",
        500: "internal error", 503: "no healthy worker, or shutting down", 504: "the request's deadline passed"}


# One server-sent event: `data` holds a response chunk as JSON, or [DONE].
_SSE_EVENT = {"type": "object", "properties": {"data": {"type": "string"}, "event": {"type": "string"}}}


def server_version() -> str:
    try:
        return version("splitserve")
    except PackageNotFoundError:   # run from a source tree that was never installed
        return "0+unknown"


def json_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` for a route whose JSON body is `model`."""
    return {"requestBody": {"required": True, "content": {
        "application/json": {"schema": {"$ref": _REF.format(model=model.__name__)}}}}}


def responses(ok: type[BaseModel], *errors: int, streams: bool = False) -> dict[int, dict[str, Any]]:
    """`responses` for a route: its 200 body (and server-sent events when it `streams`), its error statuses."""
    documented: dict[int, dict[str, Any]] = {200: {"model": ok}}
    if streams:
        # Before OpenAPI 3.2 (no itemSchema) an event stream's `schema` describes each event, as parsed.
        documented[200]["content"] = {"text/event-stream": {"schema": _SSE_EVENT}}
    for status in errors:
        documented[status] = {"model": ErrorResponse, "description": _WHY[status]}
    return documented


def install(app: FastAPI, request_models: Iterable[type[BaseModel]]) -> None:
    """Makes app.openapi() add the request models' schemas to the generated document."""
    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            document = get_openapi(title=app.title, version=app.version, routes=app.routes,
                                   description=app.description)
            _, schemas = models_json_schema([(model, "validation") for model in request_models],
                                            ref_template=_REF)
            document.setdefault("components", {}).setdefault("schemas", {}).update(schemas.get("$defs", {}))
            app.openapi_schema = document
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
