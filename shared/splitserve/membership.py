"""Proof that a prefill or decode worker belongs to the cluster: a gateway routes to a worker it found in Redis
only after the worker answers a fresh challenge with the cluster token.

The registry in Redis says where workers are, but anyone who can write to it can add an address; the token is
what a member holds and an impostor does not. The gateway sends a random nonce in its Stats request; the worker
answers with an HMAC-SHA256, under the token, of the nonce, its kind, the address it announces, its model and the
address of its health server (shared/serving/health_thread.py), which the gateway then checks instead.
The nonce makes an old answer useless, the address makes a relayed answer useless (a relay sits at another
address), and the kind and model keep a prefill answer from admitting a decode entry or a worker of another model.
The token itself never travels.
"""

from __future__ import annotations

import hashlib
import hmac
import os

NONCE_BYTES = 16
_DOMAIN = b"splitserve-worker-membership/v1"


def new_nonce() -> bytes:
    return os.urandom(NONCE_BYTES)


def membership_mac(token: str, nonce: bytes, kind: str, address: str, model: str, health_address: str = "") -> bytes:
    """The worker's answer. Each part is length-prefixed, so no two different tuples share a message."""
    message = bytearray(_DOMAIN)
    for part in (nonce, kind.encode(), address.encode(), model.encode(), health_address.encode()):
        message += len(part).to_bytes(4, "big") + part
    return hmac.new(token.encode(), bytes(message), hashlib.sha256).digest()


def is_member(token: str, nonce: bytes, kind: str, address: str, model: str, mac: bytes,
              health_address: str = "") -> bool:
    """Whether `mac` answers `nonce` for this worker; constant-time, so timing does not reveal the right mac."""
    return hmac.compare_digest(membership_mac(token, nonce, kind, address, model, health_address), mac)
