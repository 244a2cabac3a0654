"""The data-plane interface prefill and decode use to move KV blocks to and from a kv-store.

Blocks travel as rows of a uint8 tensor `[num_blocks, block_bytes]`, each row one block's payload in the
engine's byte order (see block_io.py). Implementations: ucx_transport.py (the default: UCX, gRPC for control)
and grpc_transport.py (gRPC streams: the `tcp` fallback).
Every call carries the KV layout and the store refuses blocks under another layout, so a mismatch is an error
here, never garbage in a cache.
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch

from splitserve.protos.splitserve.v1 import common_pb2


class KVTransferError(RuntimeError):
    """A transfer failed (store unreachable, torn stream, deadline); callers fall back to recompute."""


class KVLayoutMismatchError(KVTransferError):
    """The store or the peer holds another KV layout; the message names both."""


class KVTransport(Protocol):
    name: str

    async def put_blocks(self, store_address: str, layout: common_pb2.KVLayout, hashes: list[bytes],
                         blocks: torch.Tensor, request_id: str = "", timeout_s: float = 30.0) -> int:
        """Stores `blocks[i]` under `hashes[i]`; returns how many the store now holds of them (new or present)."""
        ...

    async def get_blocks(self, store_address: str, layout: common_pb2.KVLayout, hashes: list[bytes],
                         request_id: str = "", timeout_s: float = 30.0,
                         out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The payloads of the longest leading run of `hashes` the store holds, as `[k, block_bytes]` (k may be 0).

        `out` (uint8 CPU, contiguous, at least `[len(hashes), block_bytes]`): receive into it (a caller's reusable
        staging buffer, whose pages are already faulted in) and return a view of its first k rows.
        """
        ...

    async def close(self) -> None:
        ...
