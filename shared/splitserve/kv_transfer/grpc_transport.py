"""KV blocks to and from a kv-store over gRPC streams (PutBlocks/GetBlocks): the data plane without UCX.

`--kv-transport tcp` (alias "grpc"): the explicit fallback for hosts without UCX, and what any store serves.
A block goes in pieces of at most `piece_bytes` because one block of a large model can exceed a gRPC message
limit; received pieces land straight in one preallocated tensor, so a transfer costs one copy per byte, never a
growing concatenation. With checksums on, each block's crc32 rides on its first piece both ways.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import AsyncIterator, Iterator, Optional

import grpc
import torch

from splitserve.kv_blocks.checksum import ChecksumMismatchError, enabled_from_env, row_crc32s, verify_rows
from splitserve.kv_transfer import PIECE_BYTES, REQUEST_ID_METADATA_KEY
from splitserve.kv_transfer.host_buffers import receive_buffer
from splitserve.kv_transfer.store_client import (StoreChannels, block_bytes, check_out, check_rows, checksum_failure,
                                                 host_rows, metadata, transfer_error)
from splitserve.kv_transfer.transport import KVLayoutMismatchError, KVTransferError, PutRows, ReceivedBlocks
from splitserve.proto_convert import layout_mismatch
from splitserve.v1 import common_pb2, kv_store_pb2

__all__ = ["GrpcKVTransport", "PIECE_BYTES", "REQUEST_ID_METADATA_KEY"]



class GrpcKVTransport:
    name = "grpc"

    def __init__(self, piece_bytes: int = PIECE_BYTES, checksum: Optional[bool] = None,
                 channels: Optional[StoreChannels] = None):
        """`checksum` None: SPLITSERVE_KV_CHECKSUM decides. `channels`: share another transport's channels."""
        if piece_bytes < 1:
            raise ValueError(f"piece_bytes must be >= 1, got {piece_bytes}")
        self.piece_bytes = piece_bytes
        self.checksum = enabled_from_env(checksum)
        self._channels = channels or StoreChannels()
        self._owns_channels = channels is None

    async def put_blocks(self, store_address: str, layout: common_pb2.KVLayout, hashes: list[bytes],
                         blocks: PutRows, request_id: str = "", timeout_s: float = 30.0) -> int:
        """Stores `blocks[i]` under `hashes[i]`; returns how many the store now holds of them (new or present)."""
        size = block_bytes(store_address, layout)
        check_rows(layout, hashes, blocks, size)
        if not hashes:
            return 0
        rows = await host_rows(blocks)
        crc32s = await asyncio.to_thread(row_crc32s, rows) if self.checksum else None
        payload = memoryview(rows.numpy()).cast("B")
        call = self._channels.stub(store_address).PutBlocks(self._pieces(layout, hashes, payload, size, crc32s),
                                                            timeout=timeout_s, metadata=metadata(request_id))
        try:
            response = await call
        except grpc.aio.AioRpcError as exc:
            self._channels.failed(store_address, exc)
            raise transfer_error(store_address, "PutBlocks", exc) from exc
        return response.stored_blocks + response.already_present_blocks

    async def get_blocks(self, store_address: str, layout: common_pb2.KVLayout, hashes: list[bytes],
                         request_id: str = "", timeout_s: float = 30.0,
                         out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The payloads of the longest leading run of `hashes` the store holds, as `[k, block_bytes]` (k may be 0).

        The result is a view of the first k rows of `out` (see KVTransport.get_blocks) or of a new buffer.
        """
        size = block_bytes(store_address, layout)
        if not hashes:
            return torch.empty((0, size), dtype=torch.uint8)
        out = check_out(out, len(hashes), size) if out is not None else await receive_buffer(len(hashes), size)
        memory = memoryview(out.numpy()).cast("B")
        request = kv_store_pb2.GetBlocksRequest(layout=layout, block_hashes=common_pb2.BlockHashes(hashes=hashes),
                                                max_chunk_bytes=self.piece_bytes)
        call = self._channels.stub(store_address).GetBlocks(request, timeout=timeout_s, metadata=metadata(request_id))
        done = received = 0  # complete blocks; bytes of the block being received
        crc32s: list[Optional[int]] = []
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
                    crc32s.append(chunk.crc32 if chunk.HasField("crc32") else None)
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
            self._channels.failed(store_address, exc)
            raise transfer_error(store_address, "GetBlocks", exc) from exc
        except KVTransferError:
            call.cancel()
            raise
        if done < len(hashes) and not missing:
            raise _torn(store_address, f"stream ended after {done} of {len(hashes)} blocks without marking a miss")
        if self.checksum and done:
            try:
                await asyncio.to_thread(verify_rows, out[:done], crc32s, hashes[:done])
            except ChecksumMismatchError as exc:
                raise await checksum_failure(self._channels, store_address, layout, exc, request_id) from exc
        return out[:done]

    @contextlib.asynccontextmanager
    async def pinned_blocks(self, store_address: str, layout: common_pb2.KVLayout, hashes: list[bytes],
                            request_id: str = "", timeout_s: float = 30.0) -> AsyncIterator[ReceivedBlocks]:
        """Streams cannot reach the store's memory: the blocks are received into local rows (staged), which
        need no pin."""
        yield ReceivedBlocks.staged(await self.get_blocks(store_address, layout, hashes, request_id, timeout_s))

    async def close(self) -> None:
        if self._owns_channels:
            await self._channels.close()

    def _pieces(self, layout: common_pb2.KVLayout, hashes: list[bytes], payload: memoryview, size: int,
                crc32s: Optional[list[int]]) -> Iterator[kv_store_pb2.BlockChunk]:
        for i, block_hash in enumerate(hashes):
            for offset in range(0, size, self.piece_bytes):
                end = min(offset + self.piece_bytes, size)
                chunk = kv_store_pb2.BlockChunk(block_hash=block_hash, offset=offset,
                                                data=bytes(payload[i * size + offset:i * size + end]),
                                                last=end == size)
                if offset == 0:
                    chunk.layout.CopyFrom(layout)
                    if crc32s is not None:
                        chunk.crc32 = crc32s[i]
                yield chunk


def _torn(store_address: str, reason: str) -> KVTransferError:
    return KVTransferError(f"kv-store {store_address}: GetBlocks stream is malformed: {reason}")
