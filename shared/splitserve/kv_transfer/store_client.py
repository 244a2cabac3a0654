"""What every KV transport shares about talking to a kv-store: channels, payload checks, error translation.

One gRPC channel per store address, reused by every call, reconnecting quickly after a store restart; it
belongs to the event loop it is first used in (grpc.aio channels do). gRPC failures become KVTransferError, and the ones that name the layout become
KVLayoutMismatchError, so callers handle exactly two exception types whichever transport moved the bytes.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Optional

import grpc
import torch

from splitserve.kv_blocks.checksum import ChecksumMismatchError, row_crc32s
from splitserve.kv_transfer import REQUEST_ID_METADATA_KEY
from splitserve.kv_transfer.host_buffers import receive_buffer
from splitserve.kv_transfer.transport import KVChecksumError, KVLayoutMismatchError, KVTransferError
from splitserve.proto_convert import describe_layout, layout_from_proto
from splitserve.v1 import common_pb2, kv_store_pb2, kv_store_pb2_grpc
from splitserve.sampling_params import InvalidRequestError
from splitserve.serving.errors import param_from_error
from splitserve.serving import tracing
from splitserve.serving.grpc_service import CHANNEL_OPTIONS

log = logging.getLogger(__name__)

# gRPC backs off reconnecting up to 120 s by default; a kv-store back from a restart should be used within ~2 s.
# A local subchannel pool, because otherwise a new channel inherits the failed connection (and its backoff) of
# the one it replaces from gRPC's process-wide pool.
_RECONNECT_OPTIONS = (("grpc.initial_reconnect_backoff_ms", 200), ("grpc.min_reconnect_backoff_ms", 200),
                      ("grpc.max_reconnect_backoff_ms", 2000), ("grpc.use_local_subchannel_pool", 1))
_CLOSE_GRACE_S = 30.0
_LAYOUT_CODES = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
DISCARD_TIMEOUT_S = 2.0  # on a failed get's path: a store that does not answer must not hold the caller up


class StoreChannels:
    def __init__(self):
        self._channels: dict[str, tuple[grpc.aio.Channel, kv_store_pb2_grpc.KVStoreStub]] = {}
        self._closing: set[asyncio.Task] = set()

    def stub(self, address: str) -> kv_store_pb2_grpc.KVStoreStub:
        entry = self._channels.get(address)
        if entry is None:
            channel = grpc.aio.insecure_channel(address, options=[*CHANNEL_OPTIONS, *_RECONNECT_OPTIONS],
                                                interceptors=tracing.client_interceptors(address) or None)
            entry = self._channels[address] = (channel, kv_store_pb2_grpc.KVStoreStub(channel))
        return entry[1]

    def failed(self, address: str, exc: grpc.aio.AioRpcError) -> None:
        """After UNAVAILABLE the next call gets a new channel: an old one waits out its reconnect backoff, so a
        store that was restarted meanwhile would be refused until then. Calls in flight finish on the old one."""
        if exc.code() != grpc.StatusCode.UNAVAILABLE or address not in self._channels:
            return
        channel, _ = self._channels.pop(address)
        task = asyncio.ensure_future(channel.close(grace=_CLOSE_GRACE_S))
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel, _ in channels.values():
            await channel.close()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)


def block_bytes(store_address: str, layout: common_pb2.KVLayout) -> int:
    """Payload size of one block under `layout`; KVLayoutMismatchError if the layout is unusable."""
    try:
        size = layout_from_proto(layout).bytes_per_block
    except InvalidRequestError as exc:
        raise KVLayoutMismatchError(f"kv-store {store_address}: unusable KV layout: {exc}") from exc
    if size <= 0:
        raise KVLayoutMismatchError(f"kv-store {store_address}: KV layout has a zero dimension: "
                                    f"{describe_layout(layout)}")
    return size


def check_rows(layout: common_pb2.KVLayout, hashes: list[bytes], blocks, size: int) -> None:
    """A put's payload must be uint8 `[len(hashes), size]` (a tensor, or lent cache blocks of that shape): a
    wrong row size is a layout mismatch."""
    if not isinstance(blocks, torch.Tensor):
        if len(blocks.shape) != 2 or blocks.shape[0] != len(hashes):
            raise ValueError(f"{len(hashes)} hashes for {blocks.shape[0]} lent blocks")
    elif blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[0] != len(hashes):
        raise ValueError(f"blocks must be a uint8 tensor [len(hashes)={len(hashes)}, block_bytes], "
                         f"got {blocks.dtype} {tuple(blocks.shape)}")
    if blocks.shape[1] != size:
        raise KVLayoutMismatchError(f"blocks of {blocks.shape[1]} bytes do not match the KV layout "
                                    f"({describe_layout(layout)}: {size} bytes per block)")


def check_out(out: torch.Tensor, num_rows: int, size: int) -> torch.Tensor:
    """A caller's receive buffer, as `[num_rows, size]` rows of it."""
    if (out.dtype != torch.uint8 or out.device.type != "cpu" or not out.is_contiguous()
            or out.numel() < num_rows * size):
        raise ValueError(f"out must be a contiguous uint8 CPU tensor of at least {num_rows} x {size} bytes, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    return out.view(-1)[:num_rows * size].view(num_rows, size)


def check_store_block_bytes(store_address: str, layout: common_pb2.KVLayout, expected: int, got: int) -> None:
    """The store sizes blocks from the same layout; a different size means the two sides read it differently."""
    if got != expected:
        raise KVLayoutMismatchError(f"kv-store {store_address} sizes blocks of {describe_layout(layout)} at {got} "
                                    f"bytes, this worker at {expected}: they disagree about the KV layout")


async def checksum_failure(channels: StoreChannels, store_address: str, layout: common_pb2.KVLayout,
                           exc: ChecksumMismatchError, request_id: str = "") -> KVTransferError:
    """The error for a get whose verification failed, for the caller to raise. A corrupt block is reported to
    the store first (Discard), which drops it so the next writer of that prefix replaces it; otherwise it would
    stay (first writer wins) and fail every later reader."""
    if exc.corrupt_block is None:  # no checksum to compare with: the bytes are not known to be bad
        return KVChecksumError(f"kv-store {store_address}: {exc}")
    try:
        await channels.stub(store_address).Discard(kv_store_pb2.DiscardRequest(
            request_id=request_id, layout=layout, block_hashes=common_pb2.BlockHashes(hashes=[exc.corrupt_block])),
            timeout=DISCARD_TIMEOUT_S, metadata=metadata(request_id))
    except grpc.aio.AioRpcError as rpc_exc:
        log.warning("kv-store %s: could not report corrupt block %s (%s: %s); it stays until evicted",
                    store_address, exc.corrupt_block.hex(), rpc_exc.code().name, rpc_exc.details())
    return KVChecksumError(f"kv-store {store_address}: {exc}")


def metadata(request_id: str) -> Optional[tuple[tuple[str, str], ...]]:
    return ((REQUEST_ID_METADATA_KEY, request_id),) if request_id else None


def transfer_error(store_address: str, method: str, exc: grpc.aio.AioRpcError) -> KVTransferError:
    if exc.code() in _LAYOUT_CODES and param_from_error(exc) == "layout":
        return KVLayoutMismatchError(f"kv-store {store_address}: {exc.details()}")
    return KVTransferError(f"kv-store {store_address}: {method} failed: {exc.code().name}: {exc.details()}")


async def host_rows(blocks) -> torch.Tensor:
    """A put's payload as contiguous host rows: lent cache blocks are copied out (off the event loop)."""
    if isinstance(blocks, torch.Tensor):
        return blocks.detach().cpu().contiguous()
    out = await receive_buffer(*blocks.shape)  # faulted-in memory: the gather is not paced by page faults
    return await asyncio.to_thread(blocks.rows, out)


async def payload_crc32s(blocks) -> list[int]:
    """Each row's CRC-32, computed over the source (lent cache blocks in place), off the event loop."""
    if isinstance(blocks, torch.Tensor):
        return await asyncio.to_thread(row_crc32s, blocks.detach().cpu().contiguous())
    return await asyncio.to_thread(blocks.row_crc32s)
