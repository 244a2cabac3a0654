"""What the prefill and decode servicers share: the engine they serve through, the KV data plane, and reading a
prompt's blocks from a kv-store.

Both read stored blocks the same way: the leading blocks this engine's prefix cache already holds are not
pulled again (a copy costs more than a lookup), and the rest come from the store under one pin. What a missing
block means differs (prefill: compute it, as usual; decode: a recompute, counted by reason), so each servicer
counts and logs its own outcome from the StoredPrefix it gets.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable, Optional

from splitserve.kv_transfer.metrics import KV_TRANSFER_FAILURES, record_transfer
from splitserve.kv_transfer.transport import KVTransferError, ReceivedBlocks
from splitserve.serving import tracing
from splitserve.serving.engine_worker import WorkerIdentity
from splitserve.v1 import common_pb2


@dataclass
class StoredPrefix:
    """Where a prompt's leading blocks (`hashes`) come from: the first `local` from this engine's prefix cache,
    the next `received.count` from the store (readable while the `async with` lasts); the rest are computed."""
    hashes: list[bytes]
    local: int
    received: Optional[ReceivedBlocks] = None
    error: Optional[KVTransferError] = None     # why the pull failed, when it did

    @property
    def received_count(self) -> int:
        return self.received.count if self.received is not None else 0

    @property
    def missing(self) -> int:
        """Blocks neither here nor in the store."""
        return len(self.hashes) - self.local - self.received_count

    @property
    def kv_blocks(self) -> Optional[tuple[list[bytes], ReceivedBlocks]]:
        """The engine's `kv_blocks` argument: the received blocks and their hashes, or None."""
        if not self.received_count:
            return None
        return self.hashes[self.local: self.local + self.received_count], self.received


def kv_attributes(store: str, blocks: int) -> dict:
    """A KV transfer span's attributes: the store it talks to, how many blocks it asks for."""
    return {"server.address": store, "splitserve.kv.blocks": blocks}


class EngineServicer:
    """Base of the prefill and decode servicers."""

    def __init__(self, engine, transport, kv_timeout_s: float, identity: WorkerIdentity,
                 is_draining: Callable[[], bool]):
        self.engine = engine
        self.transport = transport
        self.kv_timeout_s = kv_timeout_s
        self.identity = identity
        self.is_draining = is_draining

    @contextlib.asynccontextmanager
    async def stored_prefix(self, store: str, layout: common_pb2.KVLayout, hashes: list[bytes],
                            request_id: str) -> AsyncIterator[StoredPrefix]:
        """`async with`: the StoredPrefix of `hashes` (a prompt's leading full blocks, in order) in this engine
        and the kv-store at `store`. A failed pull is counted in splitserve_kv_transfer_failures_total and left
        in `error` for the caller to log: it only costs compute."""
        local = await self.engine.cached_prefix_blocks(hashes)
        if local == len(hashes):
            yield StoredPrefix(hashes, local)
            return
        async with contextlib.AsyncExitStack() as pinned:
            started = time.monotonic()
            with tracing.span("kv get", kv_attributes(store, len(hashes) - local)) as span:
                try:
                    received = await pinned.enter_async_context(self.transport.pinned_blocks(
                        store, layout, hashes[local:], request_id, timeout_s=self.kv_timeout_s))
                except KVTransferError as exc:
                    KV_TRANSFER_FAILURES.labels("get", type(exc).__name__).inc()
                    span.set_attribute("error.type", type(exc).__name__)
                    found = StoredPrefix(hashes, local, error=exc)
                else:
                    record_transfer("get", time.monotonic() - started, received.nbytes, received.count)
                    span.set_attributes({"splitserve.kv.received_blocks": received.count,
                                         "splitserve.kv.bytes": received.nbytes})
                    found = StoredPrefix(hashes, local, received)
            yield found
