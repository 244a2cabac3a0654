"""The JSON body of an OpenAI request, read and checked before any work is done for it.

Refused with an OpenAI error naming the parameter where there is one: a body over max_body_bytes (413, from
Content-Length before reading any of it, else as soon as the count passes the limit), malformed JSON or NaN /
Infinity (400; Python's json accepts them and NaN passes every range check), text that is not valid Unicode
(400: JSON's \\ud800 escapes decode to lone surrogates that no tokenizer can take), and wrong types (400, not
FastAPI's 422).
"""

from __future__ import annotations

import json
import logging
from typing import Any, Optional

from pydantic import BaseModel, ValidationError
from starlette.requests import Request

from splitserve.sampling_params import InvalidRequestError
from splitserve.services.gateway import metrics
from splitserve.services.gateway.errors import RequestTooLargeError

log = logging.getLogger(__name__)

_PYDANTIC_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none"}


async def parse_body(request: Request, schema: type[BaseModel], max_body_bytes: int) -> BaseModel:
    raw = await _read_body(request, max_body_bytes)
    try:
        data = json.loads(raw, parse_constant=_refuse_constant)
    except ValueError as exc:
        raise InvalidRequestError(f"the request body is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise InvalidRequestError("the request body must be a JSON object")
    unencodable = _first_unencodable_string(data, ())
    if unencodable is not None:
        param = _param_name(unencodable) or None
        metrics.REJECTED_INPUT.labels("invalid_unicode").inc()
        raise InvalidRequestError(f"{param or 'a key'}: the text holds a lone UTF-16 surrogate (e.g. \\ud800), "
                                  f"which is not valid Unicode", param)
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = _param_name(first["loc"])
        more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
        raise InvalidRequestError(f"{param}: {first['msg']}{more}", param) from exc


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused (413) as soon as it is known to exceed `limit`: from Content-Length before reading
    any of it, else while it streams in (chunked), never holding more than `limit` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        _too_large(int(declared), limit)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            _too_large(size, limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(size: int, limit: int) -> None:
    metrics.REJECTED_INPUT.labels("body_too_large").inc()
    log.info("refused a request body of %d bytes or more: over the %d-byte limit", size, limit)
    raise RequestTooLargeError("request body", limit)


def _refuse_constant(name: str) -> float:
    """NaN and Infinity are not JSON (Python's json accepts them) and no sampling parameter can use them."""
    raise ValueError(f"{name} is not a valid JSON value")


def _first_unencodable_string(value: Any, loc: tuple) -> Optional[tuple]:
    """Where the first string (or key) that cannot be UTF-8 encoded sits; JSON's \\ud800 escapes decode to them."""
    if isinstance(value, str):
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                return loc
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            for found in (_first_unencodable_string(key, loc), _first_unencodable_string(item, (*loc, key))):
                if found is not None:
                    return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _first_unencodable_string(item, (*loc, index))
            if found is not None:
                return found
    return None


def _param_name(loc: tuple) -> str:
    """`messages[0].role` from pydantic's location, leaving out its union member tags."""
    name = ""
    for item in loc:
        if isinstance(item, int):
            name += f"[{item}]"
        elif isinstance(item, str) and item not in _PYDANTIC_TYPE_TAGS and "[" not in item:
            name += f".{item}" if name else item
        else:
            break
    return name
