from splitserve.v1 import common_pb2 as _common_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class DataPlaneEndpoint(_message.Message):
    __slots__ = ("transport", "worker_address")
    TRANSPORT_FIELD_NUMBER: _ClassVar[int]
    WORKER_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    transport: str
    worker_address: bytes
    def __init__(self, transport: _Optional[str] = ..., worker_address: _Optional[bytes] = ...) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("request_id", "layout", "block_hashes", "lease_ms")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    layout: _common_pb2.KVLayout
    block_hashes: _common_pb2.BlockHashes
    lease_ms: int
    def __init__(self, request_id: _Optional[str] = ..., layout: _Optional[_Union[_common_pb2.KVLayout, _Mapping]] = ..., block_hashes: _Optional[_Union[_common_pb2.BlockHashes, _Mapping]] = ..., lease_ms: _Optional[int] = ...) -> None: ...

class SlotAddresses(_message.Message):
    __slots__ = ("remote_addrs", "rkey_index", "rkeys")
    REMOTE_ADDRS_FIELD_NUMBER: _ClassVar[int]
    RKEY_INDEX_FIELD_NUMBER: _ClassVar[int]
    RKEYS_FIELD_NUMBER: _ClassVar[int]
    remote_addrs: _containers.RepeatedScalarFieldContainer[int]
    rkey_index: _containers.RepeatedScalarFieldContainer[int]
    rkeys: _containers.RepeatedScalarFieldContainer[bytes]
    def __init__(self, remote_addrs: _Optional[_Iterable[int]] = ..., rkey_index: _Optional[_Iterable[int]] = ..., rkeys: _Optional[_Iterable[bytes]] = ...) -> None: ...

class ReserveResponse(_message.Message):
    __slots__ = ("reservation_id", "endpoint", "block_bytes", "already_present", "slots")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    ALREADY_PRESENT_FIELD_NUMBER: _ClassVar[int]
    SLOTS_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    endpoint: DataPlaneEndpoint
    block_bytes: int
    already_present: _containers.RepeatedScalarFieldContainer[bool]
    slots: SlotAddresses
    def __init__(self, reservation_id: _Optional[str] = ..., endpoint: _Optional[_Union[DataPlaneEndpoint, _Mapping]] = ..., block_bytes: _Optional[int] = ..., already_present: _Optional[_Iterable[bool]] = ..., slots: _Optional[_Union[SlotAddresses, _Mapping]] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("reservation_id", "block_hashes", "block_crc32")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    BLOCK_CRC32_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    block_hashes: _common_pb2.BlockHashes
    block_crc32: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, reservation_id: _Optional[str] = ..., block_hashes: _Optional[_Union[_common_pb2.BlockHashes, _Mapping]] = ..., block_crc32: _Optional[_Iterable[int]] = ...) -> None: ...

class CommitResponse(_message.Message):
    __slots__ = ("committed_blocks",)
    COMMITTED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    committed_blocks: int
    def __init__(self, committed_blocks: _Optional[int] = ...) -> None: ...

class LookupRequest(_message.Message):
    __slots__ = ("layout", "block_hashes")
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    layout: _common_pb2.KVLayout
    block_hashes: _common_pb2.BlockHashes
    def __init__(self, layout: _Optional[_Union[_common_pb2.KVLayout, _Mapping]] = ..., block_hashes: _Optional[_Union[_common_pb2.BlockHashes, _Mapping]] = ...) -> None: ...

class LookupResponse(_message.Message):
    __slots__ = ("present", "prefix_blocks")
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    PREFIX_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    present: _containers.RepeatedScalarFieldContainer[bool]
    prefix_blocks: int
    def __init__(self, present: _Optional[_Iterable[bool]] = ..., prefix_blocks: _Optional[int] = ...) -> None: ...

class PinRequest(_message.Message):
    __slots__ = ("request_id", "layout", "block_hashes", "lease_ms", "leading_run")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    LEASE_MS_FIELD_NUMBER: _ClassVar[int]
    LEADING_RUN_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    layout: _common_pb2.KVLayout
    block_hashes: _common_pb2.BlockHashes
    lease_ms: int
    leading_run: bool
    def __init__(self, request_id: _Optional[str] = ..., layout: _Optional[_Union[_common_pb2.KVLayout, _Mapping]] = ..., block_hashes: _Optional[_Union[_common_pb2.BlockHashes, _Mapping]] = ..., lease_ms: _Optional[int] = ..., leading_run: _Optional[bool] = ...) -> None: ...

class PinResponse(_message.Message):
    __slots__ = ("pin_id", "pinned", "endpoint", "block_bytes", "locations", "crc32", "has_crc32")
    PIN_ID_FIELD_NUMBER: _ClassVar[int]
    PINNED_FIELD_NUMBER: _ClassVar[int]
    ENDPOINT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_BYTES_FIELD_NUMBER: _ClassVar[int]
    LOCATIONS_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    HAS_CRC32_FIELD_NUMBER: _ClassVar[int]
    pin_id: str
    pinned: _containers.RepeatedScalarFieldContainer[bool]
    endpoint: DataPlaneEndpoint
    block_bytes: int
    locations: SlotAddresses
    crc32: _containers.RepeatedScalarFieldContainer[int]
    has_crc32: _containers.RepeatedScalarFieldContainer[bool]
    def __init__(self, pin_id: _Optional[str] = ..., pinned: _Optional[_Iterable[bool]] = ..., endpoint: _Optional[_Union[DataPlaneEndpoint, _Mapping]] = ..., block_bytes: _Optional[int] = ..., locations: _Optional[_Union[SlotAddresses, _Mapping]] = ..., crc32: _Optional[_Iterable[int]] = ..., has_crc32: _Optional[_Iterable[bool]] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("pin_id",)
    PIN_ID_FIELD_NUMBER: _ClassVar[int]
    pin_id: str
    def __init__(self, pin_id: _Optional[str] = ...) -> None: ...

class ReleaseResponse(_message.Message):
    __slots__ = ("released_blocks",)
    RELEASED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    released_blocks: int
    def __init__(self, released_blocks: _Optional[int] = ...) -> None: ...

class DiscardRequest(_message.Message):
    __slots__ = ("request_id", "layout", "block_hashes")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    layout: _common_pb2.KVLayout
    block_hashes: _common_pb2.BlockHashes
    def __init__(self, request_id: _Optional[str] = ..., layout: _Optional[_Union[_common_pb2.KVLayout, _Mapping]] = ..., block_hashes: _Optional[_Union[_common_pb2.BlockHashes, _Mapping]] = ...) -> None: ...

class DiscardResponse(_message.Message):
    __slots__ = ("discarded_blocks",)
    DISCARDED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    discarded_blocks: int
    def __init__(self, discarded_blocks: _Optional[int] = ...) -> None: ...

class KVStoreStatsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class KVStoreStatsResponse(_message.Message):
    __slots__ = ("blocks_used", "blocks_capacity", "bytes_used", "bytes_capacity", "pinned_blocks", "hits", "misses", "evictions", "expired_leases")
    BLOCKS_USED_FIELD_NUMBER: _ClassVar[int]
    BLOCKS_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    BYTES_USED_FIELD_NUMBER: _ClassVar[int]
    BYTES_CAPACITY_FIELD_NUMBER: _ClassVar[int]
    PINNED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    MISSES_FIELD_NUMBER: _ClassVar[int]
    EVICTIONS_FIELD_NUMBER: _ClassVar[int]
    EXPIRED_LEASES_FIELD_NUMBER: _ClassVar[int]
    blocks_used: int
    blocks_capacity: int
    bytes_used: int
    bytes_capacity: int
    pinned_blocks: int
    hits: int
    misses: int
    evictions: int
    expired_leases: int
    def __init__(self, blocks_used: _Optional[int] = ..., blocks_capacity: _Optional[int] = ..., bytes_used: _Optional[int] = ..., bytes_capacity: _Optional[int] = ..., pinned_blocks: _Optional[int] = ..., hits: _Optional[int] = ..., misses: _Optional[int] = ..., evictions: _Optional[int] = ..., expired_leases: _Optional[int] = ...) -> None: ...

class BlockChunk(_message.Message):
    __slots__ = ("block_hash", "layout", "offset", "data", "last", "missing", "crc32")
    BLOCK_HASH_FIELD_NUMBER: _ClassVar[int]
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    LAST_FIELD_NUMBER: _ClassVar[int]
    MISSING_FIELD_NUMBER: _ClassVar[int]
    CRC32_FIELD_NUMBER: _ClassVar[int]
    block_hash: bytes
    layout: _common_pb2.KVLayout
    offset: int
    data: bytes
    last: bool
    missing: bool
    crc32: int
    def __init__(self, block_hash: _Optional[bytes] = ..., layout: _Optional[_Union[_common_pb2.KVLayout, _Mapping]] = ..., offset: _Optional[int] = ..., data: _Optional[bytes] = ..., last: _Optional[bool] = ..., missing: _Optional[bool] = ..., crc32: _Optional[int] = ...) -> None: ...

class PutBlocksResponse(_message.Message):
    __slots__ = ("stored_blocks", "already_present_blocks")
    STORED_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    ALREADY_PRESENT_BLOCKS_FIELD_NUMBER: _ClassVar[int]
    stored_blocks: int
    already_present_blocks: int
    def __init__(self, stored_blocks: _Optional[int] = ..., already_present_blocks: _Optional[int] = ...) -> None: ...

class GetBlocksRequest(_message.Message):
    __slots__ = ("layout", "block_hashes", "max_chunk_bytes")
    LAYOUT_FIELD_NUMBER: _ClassVar[int]
    BLOCK_HASHES_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_BYTES_FIELD_NUMBER: _ClassVar[int]
    layout: _common_pb2.KVLayout
    block_hashes: _common_pb2.BlockHashes
    max_chunk_bytes: int
    def __init__(self, layout: _Optional[_Union[_common_pb2.KVLayout, _Mapping]] = ..., block_hashes: _Optional[_Union[_common_pb2.BlockHashes, _Mapping]] = ..., max_chunk_bytes: _Optional[int] = ...) -> None: ...
