"""KV blocks to and from a kv-store over gRPC streams (PutBlocks/GetBlocks): the data plane without UCX.

A block goes in pieces of at most `piece_bytes` because one block of a large model can exceed a gRPC message
limit; received pieces land straight in one preallocated tensor, so a transfer costs one copy per byte, never a
growing concatenation. One channel per store address, reused by every call; a transport belongs to the event
loop it is first used in (grpc.aio channels do).
"""

from __future__ import annotations

from typing import Iterator, Optional

import grpc
import torch

from splitserve.kv_transfer.transport import KVLayoutMismatchError, KVTransferError
from splitserve.protos.convert import describe_layout, layout_from_proto, layout_mismatch
from splitserve.protos.splitserve.v1 import common_pb2, kv_store_pb2, kv_store_pb2_grpc
from splitserve.sampling_params import InvalidRequestError
from splitserve.serving.errors import param_from_error
from splitserve.serving.grpc_service import insecure_channel

PIECE_BYTES = 1 << 20  # well under gRPC's 4 MiB default limit, large enough that per-message cost is noise
REQUEST_ID_METADATA_KEY = "splitserve-request-id"  # names the request in the store's logs
_LAYOUT_CODES = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)


class GrpcKVTransport:
    name = "grpc"

    def __init__(self, piece_bytes: int = PIECE_BYTES):
        if piece_bytes < 1:
            raise ValueError(f"piece_bytes must be >= 1, got {piece_bytes}")
        self.piece_bytes = piece_bytes
        self._channels: dict[str, tuple[grpc.aio.Channel, kv_store_pb2_grpc.KVStoreStub]] = {}

    async def put_blocks(self, store_address: str, layout: common_pb2.KVLayout, hashes: list[bytes],
                         blocks: torch.Tensor, request_id: str = "", timeout_s: float = 30.0) -> int:
        """Stores `blocks[i]` under `hashes[i]`; returns how many the store now holds of them (new or present)."""
        size = _block_bytes(store_address, layout)
        if blocks.dtype != torch.uint8 or blocks.dim() != 2 or blocks.shape[0] != len(hashes):
            raise ValueError(f"blocks must be a uint8 tensor [len(hashes)={len(hashes)}, block_bytes], "
                             f"got {blocks.dtype} {tuple(blocks.shape)}")
        if blocks.shape[1] != size:
            raise KVLayoutMismatchError(f"blocks of {blocks.shape[1]} bytes do not match the KV layout "
                                        f"({describe_layout(layout)}: {size} bytes per block)")
        if not hashes:
            return 0
        payload = memoryview(blocks.detach().cpu().contiguous().numpy()).cast("B")
        call = self._stub(store_address).PutBlocks(self._pieces(layout, hashes, payload, size), timeout=timeout_s,
                                                   metadata=_metadata(request_id))
        try:
            response = await call
        except grpc.aio.AioRpcError as exc:
            raise _transfer_error(store_address, "PutBlocks", exc) from exc
        return response.stored_blocks + response.already_present_blocks

    async def get_blocks(self, store_address: str, layout: common_pb2.KVLayout, hashes: list[bytes],
                         request_id: str = "", timeout_s: float = 30.0) -> torch.Tensor:
        """The payloads of the longest leading run of `hashes` the store holds, as `[k, block_bytes]` (k may be 0).

        When k < len(hashes) the result is a view of the first k rows of a len(hashes)-row buffer.
        """
        size = _block_bytes(store_address, layout)
        out = torch.empty((len(hashes), size), dtype=torch.uint8)
        if not hashes:
            return out
        memory = memoryview(out.numpy()).cast("B")
        request = kv_store_pb2.GetBlocksRequest(layout=layout, block_hashes=common_pb2.BlockHashes(hashes=hashes),
                                                max_chunk_bytes=self.piece_bytes)
        call = self._stub(store_address).GetBlocks(request, timeout=timeout_s, metadata=_metadata(request_id))
        done = received = 0  # complete blocks; bytes of the block being received
        missing = False
        try:
            async for chunk in call:
                if done == len(hashes) or chunk.block_hash != hashes[done]:
                    raise _torn(store_address, f"sent block {chunk.block_hash.hex()} where block {done} was expected")
                if chunk.missing:
                    missing = True
                    break
                if chunk.offset == 0:
                    mismatch = layout_mismatch(layout, chunk.layout)
                    if mismatch:
                        raise KVLayoutMismatchError(f"kv-store {store_address}: {mismatch}")
                if chunk.offset != received or received + len(chunk.data) > size:
                    raise _torn(store_address, f"piece at offset {chunk.offset} ({len(chunk.data)} bytes) does not "
                                               f"follow the {received} bytes received of a {size}-byte block")
                start = done * size + received
                memory[start:start + len(chunk.data)] = chunk.data
                received += len(chunk.data)
                if chunk.last:
                    if received != size:
                        raise _torn(store_address, f"block ended after {received} of {size} bytes")
                    done, received = done + 1, 0
        except grpc.aio.AioRpcError as exc:
            raise _transfer_error(store_address, "GetBlocks", exc) from exc
        except KVTransferError:
            call.cancel()
            raise
        if done < len(hashes) and not missing:
            raise _torn(store_address, f"stream ended after {done} of {len(hashes)} blocks without marking a miss")
        return out[:done]

    async def close(self) -> None:
        channels, self._channels = self._channels, {}
        for channel, _ in channels.values():
            await channel.close()

    def _stub(self, address: str) -> kv_store_pb2_grpc.KVStoreStub:
        entry = self._channels.get(address)
        if entry is None:
            channel = insecure_channel(address)
            entry = self._channels[address] = (channel, kv_store_pb2_grpc.KVStoreStub(channel))
        return entry[1]

    def _pieces(self, layout: common_pb2.KVLayout, hashes: list[bytes], payload: memoryview,
                size: int) -> Iterator[kv_store_pb2.BlockChunk]:
        for i, block_hash in enumerate(hashes):
            for offset in range(0, size, self.piece_bytes):
                end = min(offset + self.piece_bytes, size)
                chunk = kv_store_pb2.BlockChunk(block_hash=block_hash, offset=offset,
                                                data=bytes(payload[i * size + offset:i * size + end]),
                                                last=end == size)
                if offset == 0:
                    chunk.layout.CopyFrom(layout)
                yield chunk


def _block_bytes(store_address: str, layout: common_pb2.KVLayout) -> int:
    try:
        size = layout_from_proto(layout).bytes_per_block
    except InvalidRequestError as exc:
        raise KVLayoutMismatchError(f"kv-store {store_address}: unusable KV layout: {exc}") from exc
    if size <= 0:
        raise KVLayoutMismatchError(f"kv-store {store_address}: KV layout has a zero dimension: "
                                    f"{describe_layout(layout)}")
    return size


def _metadata(request_id: str) -> Optional[tuple[tuple[str, str], ...]]:
    return ((REQUEST_ID_METADATA_KEY, request_id),) if request_id else None


def _torn(store_address: str, reason: str) -> KVTransferError:
    return KVTransferError(f"kv-store {store_address}: GetBlocks stream is malformed: {reason}")


def _transfer_error(store_address: str, method: str, exc: grpc.aio.AioRpcError) -> KVTransferError:
    if exc.code() in _LAYOUT_CODES and param_from_error(exc) == "layout":
        return KVLayoutMismatchError(f"kv-store {store_address}: {exc.details()}")
    return KVTransferError(f"kv-store {store_address}: {method} failed: {exc.code().name}: {exc.details()}")
