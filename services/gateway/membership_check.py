"""The gateway's half of splitserve.membership: a prefill or decode worker gets requests only after its Stats
reply answers a fresh nonce with the cluster token and names the model this gateway serves.

Anyone who can write to Redis can announce a worker, so every discovered worker is checked. Workers given by
flag are the operator's own: without a cluster token they are trusted as configured, with one they prove
themselves like the rest. Without a token a discovered worker is checked for its model only, which keeps a
misconfigured worker out but not an impostor; the gateway warns about that at start.
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable, Optional

import grpc

from splitserve.membership import is_member, new_nonce
from splitserve.v1 import common_pb2, decode_pb2_grpc, prefill_pb2_grpc

log = logging.getLogger(__name__)

CHECKED_KINDS = ("prefill", "decode")


class Rejected(Exception):
    """The worker failed the check; `reason` is the metric label, the message says what was seen."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class NotCheckable(Exception):
    """The check cannot run now (the served model is unknown while the tokenizer is down); try again later."""


class MembershipCheck:
    def __init__(self, cluster_token: Optional[str], served_model: Callable[[], Awaitable[str]],
                 timeout_s: float = 1.0):
        """`served_model()` names the model workers must serve: the tokenizer's, the same `--model` every
        service of the stack is given."""
        self.cluster_token = cluster_token or None
        self._served_model = served_model
        self.timeout_s = timeout_s

    def required(self, kind: str, static: bool) -> bool:
        return kind in CHECKED_KINDS and (not static or self.cluster_token is not None)

    async def verify(self, kind: str, address: str, static: bool, channel: grpc.aio.Channel) -> str:
        """The worker's health address ("" if it has none) once it belongs; raises Rejected or NotCheckable."""
        try:
            model = await self._served_model()
        except Exception as exc:  # whatever the tokenizer client raises: not this worker's fault
            raise NotCheckable(f"the served model is unknown: {exc}") from exc
        nonce = new_nonce()
        try:
            stub = prefill_pb2_grpc.PrefillStub(channel) if kind == "prefill" else decode_pb2_grpc.DecodeStub(channel)
            reply = await stub.Stats(common_pb2.WorkerStatsRequest(nonce=nonce), timeout=self.timeout_s)
        except grpc.aio.AioRpcError as exc:
            raise Rejected("stats_failed", f"Stats failed: {exc.code().name} {exc.details() or ''}".strip()) from exc
        if reply.engine.model != model:
            raise Rejected("model_mismatch", f"serves model {reply.engine.model!r}, not {model!r}")
        proof = reply.membership
        if self.cluster_token is None:
            return proof.health_address
        if not proof.mac:
            raise Rejected("no_proof", "no membership proof: the worker has no cluster token")
        # A discovered worker must answer for the address it announced; a configured one may know itself under
        # another name than the one the operator dials (its proof still covers the name it gives).
        if not static and proof.address != address:
            raise Rejected("address_mismatch", f"answers as {proof.address!r}, announced as {address!r}")
        if not is_member(self.cluster_token, nonce, kind, proof.address, reply.engine.model, proof.mac,
                         proof.health_address):
            raise Rejected("bad_proof", "membership proof does not match this gateway's cluster token")
        return proof.health_address
