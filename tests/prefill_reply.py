"""A Prefill call's streamed reply read as one message, for tests that drive a prefill worker directly."""

from __future__ import annotations

from splitserve.v1 import prefill_pb2


async def prefill_reply(stub, request: prefill_pb2.PrefillRequest, timeout: float) -> prefill_pb2.PrefillResponse:
    """The first message (the first token) with the kv_handle of the second, when one came."""
    reply = None
    messages = 0
    async for message in stub.Prefill(request, timeout=timeout):
        messages += 1
        if reply is None:
            assert not message.HasField("kv_handle"), "the first token must not wait for the KV handoff"
            reply = message
        else:
            assert {field.name for field, _ in message.ListFields()} <= {"request_id", "kv_handle"}, message
            if message.HasField("kv_handle"):
                reply.kv_handle.CopyFrom(message.kv_handle)
    assert reply is not None and messages == (1 if reply.finish_reason else 2), messages
    return reply
