"""Typed errors from shared code become gRPC statuses at the edge; the gateway turns them into OpenAI errors.

The offending request field travels in trailing metadata (`splitserve-param`) so the gateway can fill the
OpenAI error body's `param` without parsing messages.
"""

from __future__ import annotations

from typing import Optional

import grpc

from splitserve.sampling_params import InvalidRequestError

PARAM_METADATA_KEY = "splitserve-param"


async def abort_engine_error(context: grpc.aio.ServicerContext, exc: Exception, outcomes) -> None:
    """Ends an engine worker's call for an InvalidRequestError (INVALID_ARGUMENT, the user's fault) or an
    EngineDeadError (UNAVAILABLE: the gateway takes the worker out), counted in `outcomes` by label."""
    if isinstance(exc, InvalidRequestError):
        outcomes.labels("invalid").inc()
        await abort_invalid(context, exc)
    outcomes.labels("engine_dead").inc()
    await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))


async def abort_invalid(context: grpc.aio.ServicerContext, exc: InvalidRequestError) -> None:
    """Ends the call with INVALID_ARGUMENT, the user-facing message and the offending parameter."""
    if exc.param:
        context.set_trailing_metadata(((PARAM_METADATA_KEY, exc.param),))
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))


def param_from_error(error: grpc.aio.AioRpcError) -> Optional[str]:
    for key, value in error.trailing_metadata() or ():
        if key == PARAM_METADATA_KEY:
            return value
    return None
