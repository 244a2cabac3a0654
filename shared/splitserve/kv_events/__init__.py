"""KV events: which KV blocks a worker or the kv-store holds, published to Redis as they change, and the index
every gateway replica reads them from (prefix-aware routing). Vocabulary after vLLM's KV events."""

from splitserve.kv_events.events import (MEDIUM_DEVICE, MEDIUM_HOST_STORE, AllBlocksCleared, BlockRemoved,
                                         BlockStored, KVEvent, events_from_pool)

__all__ = ["MEDIUM_DEVICE", "MEDIUM_HOST_STORE", "AllBlocksCleared", "BlockRemoved", "BlockStored", "KVEvent",
           "events_from_pool"]
