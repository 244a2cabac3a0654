"""HTTP routes about the model rather than generation: its names and cards (/v1/models), its tokenizer
(/tokenize and /detokenize, in vLLM's shapes, through the tokenizer service), the server's version.

Behind the API key like generation (the tokenizer routes cost tokenizer time); /version is public, as
/health is.
"""

from __future__ import annotations

import time
from typing import Any, Awaitable, Callable

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from splitserve.services.gateway import metrics
from splitserve.services.gateway.auth import check_api_key
from splitserve.services.gateway.openai_errors import error_response
from splitserve.services.gateway.openapi_doc import json_body, responses, server_version
from splitserve.services.gateway.pipeline import Pipeline, check_token_ids
from splitserve.services.gateway.request_body import parse_body
from splitserve.services.gateway.response_schemas import (DetokenizeResponse, ModelCard, ModelList,
                                                          TokenizeResponse, VersionResponse)
from splitserve.services.gateway.schemas import DetokenizeRequest, TokenizeRequest
from splitserve.services.gateway.served_models import default_name

REQUEST_MODELS = (TokenizeRequest, DetokenizeRequest)


def add_model_routes(app: FastAPI, pipeline: Pipeline, api_key: str | None, max_body_bytes: int) -> None:
    created = int(time.time())

    async def cards() -> list[dict[str, Any]]:
        info = await pipeline.tokenizer.info()
        return [{"id": name, "object": "model", "created": created, "owned_by": "splitserve",
                 "root": default_name(info.model), "parent": None, "max_model_len": info.max_context_length}
                for name in await pipeline.served_models()]

    @app.get("/v1/models", responses=responses(ModelList, 401, 503))
    async def list_models(request: Request) -> Response:
        async def answer() -> dict[str, Any]:
            return {"object": "list", "data": await cards()}
        return await _answer("models", request, api_key, answer)

    # `:path`: a name may be a hub id, "org/name".
    @app.get("/v1/models/{model_id:path}", responses=responses(ModelCard, 401, 404, 503))
    async def retrieve_model(model_id: str, request: Request) -> Response:
        async def answer() -> dict[str, Any]:
            name, _ = await pipeline.resolve_model(model_id or None)
            return next(card for card in await cards() if card["id"] == name)
        return await _answer("models", request, api_key, answer)

    @app.get("/version", response_model=VersionResponse)
    async def version() -> dict[str, str]:
        return {"version": server_version()}

    @app.post("/tokenize", openapi_extra=json_body(TokenizeRequest),
              responses=responses(TokenizeResponse, 400, 401, 404, 413, 503))
    async def tokenize(request: Request) -> Response:
        async def answer() -> dict[str, Any]:
            body = await parse_body(request, TokenizeRequest, max_body_bytes)
            prompt = body.to_prompt()
            _, info = await pipeline.resolve_model(body.model)
            add_special = body.add_special_tokens is not False
            ids = await pipeline.tokenize(prompt, info, add_special_tokens=add_special,
                                          add_generation_prompt=body.add_generation_prompt)
            reply: dict[str, Any] = {"count": len(ids), "max_model_len": info.max_context_length, "tokens": ids,
                                     "token_strs": None}
            if body.return_token_strs:
                reply["token_strs"] = await pipeline.tokenizer.token_texts(ids)
            return reply
        return await _answer("tokenize", request, api_key, answer)

    @app.post("/detokenize", openapi_extra=json_body(DetokenizeRequest),
              responses=responses(DetokenizeResponse, 400, 401, 404, 413, 503))
    async def detokenize(request: Request) -> Response:
        async def answer() -> dict[str, Any]:
            body = await parse_body(request, DetokenizeRequest, max_body_bytes)
            _, info = await pipeline.resolve_model(body.model)
            check_token_ids(body.tokens, info, "tokens")
            return {"prompt": await pipeline.tokenizer.detokenize(body.tokens)}
        return await _answer("detokenize", request, api_key, answer)


async def _answer(endpoint: str, request: Request, api_key: str | None,
                  produce: Callable[[], Awaitable[dict[str, Any]]]) -> Response:
    """The body `produce` makes, or the OpenAI error for why it could not; counted per endpoint and status."""
    try:
        check_api_key(request.headers.get("authorization"), api_key)
        response: Response = JSONResponse(await produce())
    except Exception as exc:
        response = error_response(exc)
    return metrics.count_response(endpoint, response)
