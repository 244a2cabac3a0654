"""What a failed call to a backend means for the user's request, in one place for every backend."""

from __future__ import annotations

from typing import Optional

import grpc

from splitserve.sampling_params import InvalidRequestError
from splitserve.serving.errors import param_from_error
from splitserve.services.gateway.errors import RequestTimeoutError, UpstreamError

# Codes that say the worker (not this request) is broken or gone: route around it.
WORKER_DOWN_CODES = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED, grpc.StatusCode.UNKNOWN})


def translate_rpc_error(service: str, exc: grpc.aio.AioRpcError, default_param: Optional[str] = None) -> Exception:
    """INVALID_ARGUMENT is the user's fault (400, naming the parameter); DEADLINE_EXCEEDED is the request's
    deadline (every backend call carries what is left of it); anything else is the service's."""
    code = exc.code()
    details = exc.details() or code.name
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return InvalidRequestError(details, param_from_error(exc) or default_param)
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return RequestTimeoutError(f"the request timed out waiting for the {service}")
    return UpstreamError(f"{service} failed: {code.name}: {details}", retryable=code in WORKER_DOWN_CODES
                         or code == grpc.StatusCode.RESOURCE_EXHAUSTED)
