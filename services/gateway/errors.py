"""Why a request failed, as types; the edges (openai_errors.py, grpc_api.py) turn them into HTTP/gRPC statuses.

Bad user input is `splitserve.sampling_params.InvalidRequestError` (it names the offending parameter);
everything here is the gateway's own reasons.
"""

from __future__ import annotations

from typing import Optional

from splitserve.sampling_params import InvalidRequestError


class ContextLengthExceededError(InvalidRequestError):
    """The prompt (plus the tokens asked for) does not fit the model's context window."""


class UnsupportedFeatureError(InvalidRequestError):
    """A valid OpenAI parameter this server does not implement; said plainly instead of being ignored."""


class RequestTooLargeError(InvalidRequestError):
    """The body or the prompt is over a configured byte limit; refused before it is read whole or tokenized."""

    def __init__(self, what: str, limit: int, param: Optional[str] = None):
        super().__init__(f"the {what} is larger than this server's limit of {limit} bytes", param)
        self.limit = limit


class GatewayError(Exception):
    """Base of the failures that are not the user's input."""


class AuthenticationError(GatewayError):
    pass


class ModelNotFoundError(GatewayError):
    def __init__(self, model: str, served: Optional[str]):
        super().__init__(f"The model `{model}` does not exist; this server serves `{served}`")
        self.model = model


class NoHealthyWorkerError(GatewayError):
    def __init__(self, kind: str):
        super().__init__(f"no healthy {kind} worker is available; try again shortly")
        self.kind = kind


class DrainingError(GatewayError):
    def __init__(self) -> None:
        super().__init__("the gateway is shutting down and takes no new requests; retry on another replica")


class OverloadedError(GatewayError):
    """max_in_flight requests are running and max_queued waiting: shed now rather than queue without bound."""

    def __init__(self, retry_after_s: int):
        super().__init__("the server is at capacity and its queue is full; retry after a short wait")
        self.retry_after_s = retry_after_s


class ShutdownError(GatewayError):
    """The gateway stopped (its drain grace ran out) before the request finished."""

    def __init__(self) -> None:
        super().__init__("the gateway shut down before the request finished; retry on another replica")


class RequestTimeoutError(GatewayError):
    """The request's deadline (request_timeout_s) passed while a backend was still working on it."""


class UpstreamError(GatewayError):
    """A backend service failed the request. `retryable` when the service was unreachable (the client may
    simply retry), not when it reported an internal error."""

    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable
