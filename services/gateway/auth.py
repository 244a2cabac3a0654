"""The API key check, the same for the REST (Authorization header) and the gRPC API (authorization metadata)."""

from __future__ import annotations

import hmac
from typing import Optional

from splitserve.services.gateway.errors import AuthenticationError


def check_api_key(authorization: Optional[str], api_key: Optional[str]) -> None:
    """Raises AuthenticationError unless no key is configured or `authorization` is `Bearer <the key>`."""
    if api_key is None:
        return
    if not authorization:
        raise AuthenticationError("missing API key: send the header `Authorization: Bearer <key>`")
    scheme, _, token = authorization.partition(" ")
    # compare_digest: the time taken must not reveal how much of a guessed key was right.
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise AuthenticationError("incorrect API key provided")
