"""Failures as OpenAI error bodies: `{"error": {"message", "type", "param", "code"}}` with the matching status.

OpenAI clients branch on the status and read `code`; the body shape matters as much as the status.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

from starlette.responses import JSONResponse

from splitserve.sampling_params import InvalidRequestError
from splitserve.services.gateway.errors import (AuthenticationError, ContextLengthExceededError, DrainingError,
                                                ModelNotFoundError, NoHealthyWorkerError, OverloadedError,
                                                RequestTimeoutError, RequestTooLargeError, ShutdownError,
                                                UnsupportedFeatureError, UpstreamError)

log = logging.getLogger(__name__)


def error_body(message: str, type_: str, param: Optional[str] = None, code: Optional[str] = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def describe(exc: BaseException) -> tuple[int, dict[str, Any]]:
    """(HTTP status, body) for any exception; unknown ones are logged and reported as internal errors."""
    if isinstance(exc, ContextLengthExceededError):
        return 400, error_body(str(exc), "invalid_request_error", exc.param, "context_length_exceeded")
    if isinstance(exc, UnsupportedFeatureError):
        return 400, error_body(str(exc), "invalid_request_error", exc.param, "unsupported_parameter")
    if isinstance(exc, RequestTooLargeError):
        return 413, error_body(str(exc), "invalid_request_error", exc.param, "request_too_large")
    if isinstance(exc, InvalidRequestError):
        return 400, error_body(str(exc), "invalid_request_error", exc.param)
    if isinstance(exc, AuthenticationError):
        return 401, error_body(str(exc), "authentication_error", None, "invalid_api_key")
    if isinstance(exc, ModelNotFoundError):
        return 404, error_body(str(exc), "invalid_request_error", "model", "model_not_found")
    if isinstance(exc, OverloadedError):
        return 429, error_body(str(exc), "rate_limit_error", None, "rate_limit_exceeded")
    if isinstance(exc, NoHealthyWorkerError):
        return 503, error_body(str(exc), "service_unavailable_error", None, "no_healthy_worker")
    if isinstance(exc, (DrainingError, ShutdownError)):
        return 503, error_body(str(exc), "service_unavailable_error", None, "shutting_down")
    if isinstance(exc, RequestTimeoutError):
        return 504, error_body(str(exc), "timeout_error", None, "timeout")
    if isinstance(exc, UpstreamError):
        if exc.retryable:
            return 503, error_body(str(exc), "service_unavailable_error", None, "upstream_unavailable")
        return 500, error_body(str(exc), "internal_error", None, "upstream_error")
    log.error("internal error", exc_info=exc)
    return 500, error_body("internal error; see the gateway's log", "internal_error")


def error_response(exc: BaseException) -> JSONResponse:
    status, body = describe(exc)
    # OpenAI's SDKs wait Retry-After seconds before they retry a 429.
    headers = {"Retry-After": str(exc.retry_after_s)} if isinstance(exc, OverloadedError) else None
    return JSONResponse(body, status_code=status, headers=headers)
